"""Joint orders and index maps shared by the dataset readers.

LSP-14 (REFERENCE.md 2): right ankle, right knee, right hip, left hip, left knee, left ankle, right wrist,
right elbow, right shoulder, left shoulder, left elbow, left wrist, neck, head top.
"""
from __future__ import annotations

LSP14_NAMES = ("right_ankle", "right_knee", "right_hip", "left_hip", "left_knee", "left_ankle",
               "right_wrist", "right_elbow", "right_shoulder", "left_shoulder", "left_elbow", "left_wrist",
               "neck", "head_top")

# 17 H36M joints (J_regressor_h36m rows) -> LSP-14; H36M joint 0 is the pelvis.
H36M_TO_J14 = [6, 5, 4, 1, 2, 3, 16, 15, 14, 11, 12, 13, 8, 10]
H36M_PELVIS = 0

# SPIN's 24 ground-truth joints (the ``S`` and ``part`` arrays of SPIN/PARE npz files):
# 0-11 LSP limbs, 12 neck (LSP), 13 top of head (LSP), 14 pelvis (MPII), 15 thorax (MPII), 16 spine (H36M),
# 17 jaw (H36M), 18 head (H36M), 19 nose, 20 left eye, 21 right eye, 22 left ear, 23 right ear.
# SPIN evaluates against J24_TO_J14 = joints 0-12 and 18: the 14th joint is the H36M head, which is what
# the predicted LSP-14 (H36M_TO_J14) ends with. SPIN's Human3.6M preprocessing stores the H36M root in
# joint 14 and root-centres S, so joint 14 is the `h36m-root` pelvis.
J24_TO_J14 = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 18]
J24_HEAD_TOP_LSP = 13
J24_PELVIS = 14
J24_RIGHT_HIP, J24_LEFT_HIP = 2, 3

LSP14_RIGHT_HIP, LSP14_LEFT_HIP, LSP14_NECK, LSP14_HEAD_TOP = 2, 3, 12, 13

# 3DPW poses2d: 18 OpenPose-COCO joints (used only for the person box).
COCO18_NAMES = ("nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
                "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
                "right_eye", "left_eye", "right_ear", "left_ear")

# mmhuman3d HUMAN_DATA convention (190 keypoints): for each LSP-14 joint, the HUMAN_DATA indices that can
# stand for it, best first (the J_regressor_extra / LSP variants first, then SMPL, then OpenPose).
HUMANDATA_NUM_KEYPOINTS = 190
HUMANDATA_TO_J14_CANDIDATES = [
    [8, 164],          # right_ankle, right_ankle_openpose
    [5, 163],          # right_knee
    [144, 2, 162],     # right_hip_extra, right_hip, right_hip_openpose
    [145, 1, 165],     # left_hip_extra, left_hip, left_hip_openpose
    [4, 166],          # left_knee
    [7, 167],          # left_ankle
    [21, 157],         # right_wrist
    [19, 156],         # right_elbow
    [17, 155],         # right_shoulder
    [16, 158],         # left_shoulder
    [18, 159],         # left_elbow
    [20, 160],         # left_wrist
    [146, 12, 154],    # neck_extra, neck, neck_openpose
    [147, 186, 152, 185],  # headtop, headtop_h36m, head_extra, head_h36m
]

# 3DPW test split (24 sequence folders) and 3DPW-OCC (17 sequence names without the trailing _NN).
PW3D_TEST_SEQUENCES = frozenset("""
flat_packBags_00 downtown_weeklyMarket_00 outdoors_fencing_01 downtown_walkBridge_01 downtown_enterShop_00
downtown_rampAndStairs_00 downtown_bar_00 downtown_runForBus_01 downtown_cafe_00 flat_guitar_01
downtown_runForBus_00 downtown_sitOnStairs_00 downtown_bus_00 downtown_arguing_00 downtown_crossStreets_00
downtown_walkUphill_00 downtown_walking_00 downtown_car_00 downtown_warmWelcome_00 downtown_upstairs_00
downtown_stairs_00 downtown_windowShopping_00 office_phoneCall_00 downtown_downstairs_00""".split())
assert len(PW3D_TEST_SEQUENCES) == 24

PW3D_OCC_SEQUENCES = frozenset("""
courtyard_backpack courtyard_basketball courtyard_bodyScannerMotions courtyard_box courtyard_golf
courtyard_jacket courtyard_laceShoe downtown_stairs flat_guitar flat_packBags outdoors_climbing
outdoors_crosscountry outdoors_fencing outdoors_freestyle outdoors_golf outdoors_parcours outdoors_slalom""".split())
assert len(PW3D_OCC_SEQUENCES) == 17
