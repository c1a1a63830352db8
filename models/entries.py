"""One entry per zoo model. Read this file to see what the zoo holds and which file each model needs."""
from occbench.models import ModelEntry, register

SMPL_COPIES = (r"^smpl\.", r"^smpl_native\.", r"^smpl\.smpl\.", r"^body_part_texture$", r"^K$", r"^R$",
               r"^smpl_faces$", r"^part_label_bins$", r"^J_regressor$")

register(ModelEntry(
    name="pare",
    description="PARE: part attention regressor (HRNet-W32 default; backbone='resnet50' with head='2x128'|'3x256')",
    builder="occbench.models.pare:build",
    options={"backbone": "hrnet_w32", "head": "2x128"},
    checkpoint_files=("pare_checkpoint.ckpt", "pare_w_3dpw_checkpoint.ckpt"),
    checkpoint_source="https://github.com/mkocabas/PARE (scripts/prepare_data.sh: data/pare/checkpoints/)",
    checkpoint_format="lightning",
    strip_prefixes=("model.",),
    known_unused=SMPL_COPIES + (r"^backbone\.final_layer\.",),
    manifest="pare_hrnet_w32.tsv",
    paper="Kocabas et al., ICCV 2021",
    license="PARE license: non-commercial research use",
))

register(ModelEntry(
    name="spin",
    description="SPIN: HMR regressor (ResNet-50, 3 IEF iterations, 6D rotations)",
    builder="occbench.models.spin:build",
    checkpoint_files=("model_checkpoint.pt",),
    checkpoint_source="SPIN's fetch_data.sh (https://github.com/nkolot/SPIN: data/model_checkpoint.pt)",
    checkpoint_format="model-dict",
    manifest="spin_hmr.tsv",
    paper="Kolotouros et al., ICCV 2019",
    license="SPIN license (BSD-3-Clause code; SMPL terms apply)",
))

register(ModelEntry(
    name="hmr-eft",
    description="HMR trained with EFT pseudo-labels (same network as SPIN)",
    builder="occbench.models.spin:build",
    checkpoint_files=("hmr_eft.pt", "2020_05_31-00_50_43-best-51.749683916568756.pt"),
    checkpoint_source="https://github.com/facebookresearch/eft (released HMR-EFT checkpoints)",
    checkpoint_format="model-dict",
    manifest="spin_hmr.tsv",
    paper="Joo et al., 3DV 2021",
    license="EFT license: CC-BY-NC 4.0",
))

register(ModelEntry(
    name="danet",
    description="DaNet: decompose-and-aggregate network (h36m_itw configuration, HRNet-W48 IUV estimator)",
    builder="occbench.models.danet:build",
    checkpoint_files=("danet_model_h36m_itw.pt",),
    checkpoint_source="https://github.com/HongwenZhang/DaNet-3DHumanReconstruction (data/pretrained_model/)",
    checkpoint_format="model-dict",
    known_unused=(r"^iuv2smpl\.smpl_para_Outs\.rot2pos\.", r"^iuv2smpl\.smpl_para_Outs\.pos2rot\.",
                  r"^iuv2smpl\.smpl_para_Outs\.coord_regressors\.",
                  r"^iuv2smpl\.smpl_para_Outs\.pose_regressors\.0\."),
    manifest="danet_h36m_itw.tsv",
    paper="Zhang et al., TPAMI 2020",
    license="DaNet license: see repository (research use)",
))

register(ModelEntry(
    name="3dnbf-reg",
    description="3DNBF regressor only: PARE-style head on a UNet decoder over ResNet-50 (320 px input)",
    builder="occbench.models.nbf:build_regressor",
    input_size=320,
    checkpoint_files=("3dnbf_r50.pth",),
    checkpoint_source="https://github.com/edz-o/3DNBF (data/pretrained/3dnbf_r50.pth)",
    checkpoint_format="mmcv",
    known_unused=(r"^backbone\.dummy_token$", r"^body_model_train\.", r"^body_model_test\."),
    manifest="3dnbf_r50.tsv",
    paper="Zhang et al., ICCV 2023",
    license="3DNBF license: see repository (research use)",
))

register(ModelEntry(
    name="3dnbf",
    description="3DNBF: regressor initialisation + test-time fitting of Neural Body Volumes",
    builder="occbench.models.nbf:build_fitter",
    input_size=320,
    checkpoint_files=("3dnbf_r50.pth",),
    checkpoint_source="https://github.com/edz-o/3DNBF (data/pretrained/3dnbf_r50.pth)",
    checkpoint_format="mmcv",
    known_unused=(r"^backbone\.dummy_token$", r"^body_model_train\.", r"^body_model_test\."),
    manifest="3dnbf_r50.tsv",
    paper="Zhang et al., ICCV 2023",
    license="3DNBF license: see repository (research use)",
))

register(ModelEntry(
    name="bopr",
    description="BoPR: body-aware part regressor (from the paper; no official code or weights)",
    builder="occbench.models.bopr:build",
    options={"backbone": "hrnet_w32"},
    checkpoint_files=("bopr.pt",),
    checkpoint_source="no public weights: train one with `occbench train --model bopr`",
    checkpoint_format="occbench",
    paper="Cheng et al., 2023",
    license="occbench implementation (MIT)",
))

register(ModelEntry(
    name="hkmr",
    description="HKMR: hierarchical kinematic regressor (from the paper; no official code or weights)",
    builder="occbench.models.hkmr:build",
    checkpoint_files=("hkmr.pt",),
    checkpoint_source="no public weights: train one with `occbench train --model hkmr`",
    checkpoint_format="occbench",
    paper="Georgakis et al., ECCV 2020",
    license="occbench implementation (MIT)",
))

register(ModelEntry(
    name="pare-demo",
    description="PARE demo model: ResNet-18 trunk cut after layer3, 2x128 head, 96 px input; weights bundled, "
                "trained on synthetic stand-in data, not comparable to published numbers",
    builder="occbench.models.pare:build",
    input_size=96,
    options={"backbone": "resnet18", "backbone_stages": 3, "head": "2x128", "input_size": 96,
             "use_mean_pose": True, "use_mean_camshape": True},
    checkpoint_files=("pare_demo.pt",),
    checkpoint_source="bundled with occbench (occbench/assets/pare_demo.pt); rebuild with `make demo-weights`",
    checkpoint_format="model-dict",
    paper="Kocabas et al., ICCV 2021 (architecture); weights: occbench, synthetic stand-in data",
    license="occbench demo weights (MIT)",
))
