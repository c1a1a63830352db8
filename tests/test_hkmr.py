"""HKMR (models/hkmr.py): chains, parameter count, output shapes, hierarchy wiring, iterations."""
import pytest
import torch

from helpers import mean_params
from occbench.models import hkmr
from occbench.rotations import axis_angle_to_rotmat

PAPER_PARAMETERS = 26.2e6


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return hkmr.HKMR(mean_params()).eval()


def test_chains_partition_the_24_smpl_joints():
    names = [name for name, _ in hkmr.CHAINS]
    assert names == ["root", "head", "right_arm", "left_arm", "right_leg", "left_leg"]
    joints = [j for _, chain in hkmr.CHAINS for j in chain]
    assert sorted(joints) == list(range(24))
    assert dict(hkmr.CHAINS)["root"] == (0, 3, 6, 9)          # pelvis, spine1, spine2, spine3


def test_parameter_count_is_within_5_percent_of_the_paper(model):
    total = sum(p.numel() for p in model.parameters())
    encoder = sum(p.numel() for p in model.encoder.parameters())
    print(f"HKMR parameters: {total / 1e6:.2f}M (ResNet-50 encoder {encoder / 1e6:.2f}M, "
          f"regressor {(total - encoder) / 1e6:.2f}M); paper: 26.2M")
    assert abs(total - PAPER_PARAMETERS) / PAPER_PARAMETERS < 0.05
    assert not any(k.startswith("encoder.fc") for k in model.state_dict())


@pytest.mark.parametrize("batch,size", [(1, 224), (2, 64)])
def test_output_shapes_and_finiteness(model, batch, size):
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        rotmat, betas, cam, extras = model.regress(images)
    assert rotmat.shape == (batch, 24, 3, 3) and betas.shape == (batch, 10) and cam.shape == (batch, 3)
    expected = {"pose_aa": (batch, 72), "pose_aa_iters": (batch, 3, 72), "rotmat_iters": (batch, 3, 24, 3, 3),
                "betas_iters": (batch, 3, 10), "cam_iters": (batch, 3, 3)}
    assert {k: tuple(v.shape) for k, v in extras.items()} == expected
    for t in [rotmat, betas, cam, *extras.values()]:
        assert torch.isfinite(t).all()
    assert torch.equal(extras["rotmat_iters"][:, -1], rotmat)
    assert torch.equal(extras["betas_iters"][:, -1], betas) and torch.equal(extras["cam_iters"][:, -1], cam)
    assert torch.allclose(rotmat @ rotmat.transpose(-1, -2), torch.eye(3).expand_as(rotmat), atol=1e-5)


def test_mean_pose_is_stored_as_axis_angle_of_the_6d_mean():
    mean = mean_params(1)
    model = hkmr.HKMR(mean)
    from occbench.rotations import rot6d_to_rotmat
    assert torch.allclose(axis_angle_to_rotmat(model.init_pose.view(24, 3)),
                          rot6d_to_rotmat(mean["pose"]), atol=1e-5)


def test_untrained_model_starts_near_the_mean_and_iterates(model):
    features = torch.rand(2, 2048, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, betas, cam, extras = model.regress_from_features(features)
    init = model.init_pose.view(1, 1, 72)
    assert (extras["pose_aa_iters"] - init).abs().max() < 0.2
    assert (cam - model.init_cam).abs().max() < 0.1 and (betas - model.init_shape).abs().max() < 0.1
    # every outer iteration changes the estimate
    steps = extras["pose_aa_iters"].diff(dim=1).abs().amax(dim=(0, 2))
    assert (steps > 0).all()


def test_child_chains_depend_on_the_root_chain_and_not_the_reverse(model):
    """Gradient wiring in one outer iteration: a child chain's pose depends on the root chain's output."""
    one = hkmr.HKMR(mean_params(), outer_iterations=1).eval()
    one.load_state_dict(model.state_dict())
    root_layer = one.chains["root"].forward_layers[0]
    features = torch.rand(1, 2048, generator=torch.Generator().manual_seed(1))
    _, _, _, extras = one.regress_from_features(features)
    pose = extras["pose_aa"].view(24, 3)
    left_wrist_grad = torch.autograd.grad(pose[20].sum(), root_layer.bias, retain_graph=True)[0]
    assert left_wrist_grad.abs().sum() > 0                     # left arm chain sees the root pose
    arm_layer = one.chains["left_arm"].forward_layers[0]
    pelvis_grad = torch.autograd.grad(pose[0].sum(), arm_layer.bias, allow_unused=True)[0]
    assert pelvis_grad is None or pelvis_grad.abs().sum() == 0  # the root never sees the arms


def test_forward_pass_order_within_a_chain():
    """Eq. 1: in the forward pass joint i sees the residuals of joints 0..i-1, never of later joints."""
    chain = hkmr.ChainRegressor(4, conditioned_on_root=False, inner_iterations=1)
    theta = torch.zeros(1, 12, requires_grad=True)
    out = chain(torch.rand(1, 2048), torch.zeros(1, 10), theta)
    deltas = out - theta
    g_first = torch.autograd.grad(deltas[0, 0:3].sum(), chain.forward_layers[1].weight, allow_unused=True,
                                  retain_graph=True)[0]
    assert g_first is None or g_first.abs().sum() == 0
    g_last = torch.autograd.grad(deltas[0, 9:12].sum(), chain.forward_layers[0].bias, retain_graph=True)[0]
    assert g_last.abs().sum() > 0
    # one inner iteration is a forward pass only: the backward layers are not used
    backward = list(chain.backward_layers.parameters())
    assert all(g is None for g in torch.autograd.grad(out.sum(), backward, allow_unused=True))
    # the second inner iteration is the backward pass: the last joint's residual comes first
    chain.inner_iterations = 2
    out2 = chain(torch.rand(1, 2048), torch.zeros(1, 10), theta)
    grads = torch.autograd.grad(out2[0, 9:12].sum(), [chain.backward_layers[0].bias, chain.backward_layers[3].bias],
                                allow_unused=True)
    assert grads[0].abs().sum() > 0 and (grads[1] is None or grads[1].abs().sum() == 0)


def test_checkpoint_round_trip_through_load_model(tmp_path):
    from occbench.errors import UserError
    from occbench.zoo import load_model

    random_model = load_model("hkmr", weights="random", seed=3, device="cpu")
    assert random_model.provenance["weights"] == "random" and random_model.body_model is not None
    torch.manual_seed(7)
    trained = hkmr.build()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))
    plain = tmp_path / "hkmr_plain.pt"
    torch.save({"model": trained.state_dict()}, plain)
    with_meta = tmp_path / "hkmr.pt"
    trained.save_checkpoint(with_meta, steps=10)
    assert torch.load(with_meta)["occbench"] == {"model": "hkmr", "steps": 10}
    crops = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    trained.attach_body_model(random_model.body_model).eval()
    with torch.no_grad():
        expected = trained.predict(crops)
        expected_params = trained.regress(images)
        assert not torch.allclose(expected_params[0], random_model.regress(images)[0])
    for path in (plain, with_meta):
        loaded = load_model("hkmr", checkpoint=path, device="cpu")
        state = loaded.state_dict()
        for key, value in trained.state_dict().items():
            assert torch.equal(state[key], value), key
        with torch.no_grad():
            got = loaded.regress(images)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got[:3], expected_params[:3]))
    with torch.no_grad():
        prediction = loaded.predict(crops)                 # the inherited predict() path, body attached
    assert torch.allclose(prediction.joints_lsp, expected.joints_lsp, atol=1e-6)
    assert prediction.joints2d.shape == (1, 14, 2) and torch.isfinite(prediction.vertices).all()
    # a file missing the shape network is refused with the file named
    partial = tmp_path / "hkmr_partial.pt"
    torch.save({"model": {k: v for k, v in trained.state_dict().items() if not k.startswith("shape_net.")}},
               partial)
    with pytest.raises(UserError, match="hkmr_partial.pt"):
        load_model("hkmr", checkpoint=partial, device="cpu")
