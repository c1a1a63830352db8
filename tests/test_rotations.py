import math

import pytest
import torch

from occbench.rotations import (axis_angle_to_rotmat, rot6d_to_rotmat, rotmat_to_axis_angle, rotmat_to_rot6d)


def test_axis_angle_known_values():
    r = axis_angle_to_rotmat(torch.tensor([[0.0, 0.0, math.pi / 2]]))[0]
    expected = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert torch.allclose(r, expected, atol=1e-6)
    r = axis_angle_to_rotmat(torch.tensor([[math.pi, 0.0, 0.0]]))[0]
    assert torch.allclose(r, torch.diag(torch.tensor([1.0, -1.0, -1.0])), atol=1e-6)
    assert torch.allclose(axis_angle_to_rotmat(torch.zeros(2, 3)), torch.eye(3).expand(2, 3, 3))


def test_rot6d_spin_layout():
    # SPIN/PARE: x.view(-1, 3, 2) columns are the first two columns of R
    x = torch.tensor([[1.0, 0.0, 0.0, -1.0, 0.0, 0.0]])  # 180 deg about x (SPIN's mean global orient)
    assert torch.allclose(rot6d_to_rotmat(x)[0], torch.diag(torch.tensor([1.0, -1.0, -1.0])))
    # Gram-Schmidt: a2 is made orthogonal to a1, and columns are not swapped
    x = torch.tensor([[2.0, 1.0, 0.0, 1.0, 0.0, 0.0]])  # a1 = (2,0,0), a2 = (1,1,0)
    assert torch.allclose(rot6d_to_rotmat(x)[0], torch.eye(3))


def test_roundtrips_batched():
    torch.manual_seed(0)
    aa = torch.randn(64, 3) * 1.2
    rot = axis_angle_to_rotmat(aa)
    assert torch.allclose(rot @ rot.transpose(1, 2), torch.eye(3).expand(64, 3, 3), atol=1e-5)
    assert torch.allclose(torch.det(rot), torch.ones(64), atol=1e-5)
    assert torch.allclose(rot6d_to_rotmat(rotmat_to_rot6d(rot)), rot, atol=1e-5)
    back = rotmat_to_axis_angle(rot)
    assert torch.allclose(axis_angle_to_rotmat(back), rot, atol=1e-5)
    # angles below pi come back exactly
    small = aa[aa.norm(dim=1) < 3.0]
    assert torch.allclose(rotmat_to_axis_angle(axis_angle_to_rotmat(small)), small, atol=1e-4)
    # (B, 24, 6) is read as B*24 rotations, as the models' heads do
    assert rot6d_to_rotmat(torch.randn(2, 24 * 6)).shape == (48, 3, 3)


@pytest.mark.parametrize("angle", [0.0, 1e-5, math.pi - 1e-4])
def test_axis_angle_edge_cases(angle):
    aa = torch.tensor([[0.0, angle, 0.0]])
    assert torch.allclose(axis_angle_to_rotmat(rotmat_to_axis_angle(axis_angle_to_rotmat(aa))),
                          axis_angle_to_rotmat(aa), atol=1e-5)


def test_axis_angle_gradient_finite_at_zero():
    aa = torch.zeros(1, 3, requires_grad=True)
    axis_angle_to_rotmat(aa).sum().backward()
    assert torch.isfinite(aa.grad).all()
