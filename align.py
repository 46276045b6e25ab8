"""Face alignment from landmarks: each face is mapped onto a canonical frame before the network sees it.

CFP ships 30 landmarks per image (Data/Fiducials/ID/{frontal,profile}/NN.txt, one "x,y" per line, in image
pixels): points 1-9 one side of the jaw from the ear down to the chin, 10-12 an eyebrow, 13-18 an eye, 19-25
the nose from its bridge to its base, 26-30 the mouth. Frontal faces mark the image's left half of the face;
profiles mark their visible side, and face left or right.

    box       a square around the landmarks, no rotation (a frontal box is completed by mirroring it about
              the chin, since only one half of the face is marked)
    template  a similarity transform (rotation, uniform scale, translation), least squares over all 30
              points, onto the mean shape of the training faces: one template for frontal faces, one for
              profiles (generalised Procrustes analysis)

Either way the face box fills 1/margin of the square's side, and the square sits LIFT of the box's height
above the box's centre, so the forehead stays in. Profiles that face left are mirrored, landmarks and all,
so that every profile faces right. A warp is a 3x3 matrix from the original image's pixels to the output's.
"""
import numpy as np

NUM_POINTS = 30
JAW, NOSE = slice(0, 9), slice(18, 25)
CHIN = 8            # 0-based index of the lowest jaw point
LIFT = 0.08         # the square's centre above the face box's centre, as a fraction of the box's height
MARGIN = 1.25       # the square's side as a multiple of the face box's larger side (results/cfp-seed: 1.25)
ALIGN_MODES = ("none", "box", "template")


def faces_left(points):
    """A profile faces left when its nose is left of its jaw line. points: (30, 2)."""
    return points[NOSE, 0].mean() < points[JAW, 0].mean()


def pose_of(points, profile):
    """'frontal', 'left' or 'right': the three poses the pipeline tells apart."""
    return "frontal" if not profile else ("left" if faces_left(points) else "right")


def mirror_matrix(pose):
    """x -> -x for profiles facing left (any translation after it is absorbed by the fit), else identity."""
    return np.diag([-1.0 if pose == "left" else 1.0, 1.0, 1.0])


def apply(matrix, points):
    return points @ matrix[:2, :2].T + matrix[:2, 2]


def similarity(src, dst):
    """The similarity transform (3x3) that maps src onto dst in the least-squares sense (Umeyama, 1991)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    u, sig, vt = np.linalg.svd(d.T @ s / len(src))
    sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])  # a rotation, never a reflection
    rot = u @ sign @ vt
    scale = (sig * np.diag(sign)).sum() / s.var(0).sum()
    m = np.eye(3)
    m[:2, :2] = scale * rot
    m[:2, 2] = mu_d - scale * rot @ mu_s
    return m


def face_box(points, pose):
    """(x0, y0, x1, y1) of the face. A frontal face's marked half is completed by mirroring about the chin."""
    x0, y0 = points.min(0)
    x1, y1 = points.max(0)
    if pose == "frontal":
        chin = points[CHIN, 0]
        x0, x1 = min(x0, 2 * chin - x1), max(x1, 2 * chin - x0)
    return np.array([x0, y0, x1, y1])


def square_of(box, margin):
    """The square (x0, y0, side) around a face box: margin times its larger side, lifted by LIFT."""
    w, h = box[2] - box[0], box[3] - box[1]
    side = margin * max(w, h)
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2 - LIFT * h
    return np.array([cx - side / 2, cy - side / 2, side])


def mean_shape(shapes, iters=10):
    """Generalised Procrustes mean of (N, 30, 2) shapes, centred with unit norm. It starts from the plain
    mean, so it keeps the photos' own upright orientation."""
    shapes = shapes - shapes.mean(1, keepdims=True)
    shapes = shapes / np.linalg.norm(shapes, axis=(1, 2), keepdims=True)
    mean = shapes.mean(0)
    for _ in range(iters):
        mean = mean / np.linalg.norm(mean)
        # every shape rotated and scaled onto the mean at once (similarity() for centred shapes, batched)
        u, sig, vt = np.linalg.svd(mean.T @ shapes)                  # (N, 2, 2) cross-covariances
        det = np.sign(np.linalg.det(u @ vt))
        sign = np.stack([np.ones_like(det), np.where(det == 0, 1.0, det)], 1)  # (N, 2)
        rot = (u * sign[:, None, :]) @ vt                              # a rotation, never a reflection
        scale = (sig * sign).sum(1) / (shapes ** 2).sum((1, 2))
        fitted = scale[:, None, None] * shapes @ rot.transpose(0, 2, 1)
        mean = fitted.mean(0)
    return mean / np.linalg.norm(mean)


def build_templates(landmarks, profile, margin):
    """One template per pose from training faces: {'frontal', 'profile'} -> (30, 2) in units of the output
    square's side (the square is [0, 1] x [0, 1]). landmarks: (N, 30, 2), profile: (N,) bool."""
    templates = {}
    for pose, sel in (("frontal", ~profile), ("profile", profile)):
        if not sel.any():
            raise ValueError(f"no {pose} faces to build the {pose} template from")
        shapes = np.stack([apply(mirror_matrix(pose_of(p, pose == "profile")), p) for p in landmarks[sel]])
        mean = mean_shape(shapes)
        x0, y0, side = square_of(face_box(mean, "frontal" if pose == "frontal" else "right"), margin)
        templates[pose] = (mean - [x0, y0]) / side
    return templates


def warp_matrix(points, profile, size, mode, margin=MARGIN, templates=None):
    """3x3 matrix from the original image's pixels to the size x size output's, for one face."""
    pose = pose_of(points, profile)
    flip = mirror_matrix(pose)
    points = apply(flip, points)
    if mode == "template":
        target = templates["profile" if profile else "frontal"] * size
        return similarity(points, target) @ flip
    if mode == "box":
        x0, y0, side = square_of(face_box(points, pose), margin)
        scale = size / side
        return np.array([[scale, 0, -x0 * scale], [0, scale, -y0 * scale], [0, 0, 1]]) @ flip
    raise ValueError(f"unknown alignment {mode!r}")


class Aligner:
    """How a run puts faces into its square: the mode, the margin and, for 'template', the two templates
    (kept in the checkpoint, so evaluation aligns test faces exactly as training did)."""

    def __init__(self, mode, margin=MARGIN, templates=None):
        if mode not in ALIGN_MODES[1:]:
            raise ValueError(f"unknown alignment {mode!r}")
        self.mode, self.margin = mode, margin
        self.templates = {k: np.asarray(v, dtype=np.float64) for k, v in (templates or {}).items()}

    @classmethod
    def fit(cls, mode, landmarks, profile):
        """An aligner whose templates come from these (training) faces."""
        return cls(mode, MARGIN, build_templates(landmarks, profile, MARGIN) if mode == "template" else None)

    def state(self):
        return {"mode": self.mode, "margin": self.margin,
                "templates": {k: v.tolist() for k, v in self.templates.items()}}

    def matrix(self, points, profile, size):
        return warp_matrix(points, profile, size, self.mode, self.margin, self.templates)
