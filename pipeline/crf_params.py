"""Stage 3's CRF parameters: the peer code bases' presets and their merge with ``crf.*``.

Kept apart from :mod:`stages.refine_crf` (which documents the equations each parameter
enters) so that :class:`pipeline.config.CRFConfig` can check a combination when the config
is loaded, before any stage runs, without importing the CRF stage and its dependencies.
"""

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import CRFConfig


@dataclass(frozen=True)
class CRFParams:
    """Resolved CRF parameters (the equations they enter: :mod:`stages.refine_crf`)."""

    iterations: int = 10                  # mean-field steps
    unary: str = "scores"                 # "scores" (-log S) or "labels" (argmax S, gt_prob)
    gt_prob: float = 0.7                  # labels unary: probability of the argmax label
    background: str = "power"             # "power": (1 - max M)^alpha, "constant": bg_threshold
    alpha: float = 4.0                    # power background exponent of run A
    bg_threshold: float = 0.3             # constant background score of run A
    alpha_high: float | None = None       # power background of run B (None: one run)
    bg_low_threshold: float | None = None  # constant background of run B (None: one run)
    gaussian_sxy: float = 3.0             # Gaussian kernel: position std (pixels)
    gaussian_compat: float = 3.0          # Gaussian kernel: weight w_g
    bilateral_sxy: float = 80.0           # bilateral kernel: position std (pixels)
    bilateral_srgb: float = 13.0          # bilateral kernel: colour std (0-255 units)
    bilateral_compat: float = 10.0        # bilateral kernel: weight w_b
    confidence: float | None = None       # max posterior below this -> 255
    downscale: float = 1.0                # CRF image scale (position stds scaled alike)
    saliency_ignore: float = 32 / 255     # saliency mode: salient background -> 255
    min_foreground: float = 0.01          # saliency mode: less foreground -> whole image 255
    source: str = "maps"                  # which maps of stage 2's file: "maps" (MCIS) or "cams"
    method: str = "crf"                   # "crf", or "oaa": the official gen_gt.py rules, no CRF
    fg_threshold: float = 0.3             # oaa: normalised map / 1 - saliency below this -> 0
    conflict: float = 0.99                # oaa: two channels above this -> 255
    att_threshold: float = 0.95           # oaa: map above this counts as salient

    @property
    def second_background(self) -> float | None:
        """Background parameter of the confident-background run B, or None for one run."""
        value = self.alpha_high if self.background == "power" else self.bg_low_threshold
        first = self.alpha if self.background == "power" else self.bg_threshold
        return None if value is None or value == first else value


PRESETS: dict[str, dict[str, Any]] = {
    # PSA (Ahn & Kwak, CVPR 2018): bg = (1 - max M)^alpha, la alpha 4 / ha alpha 32
    "psa": dict(iterations=10, unary="scores", background="power", alpha=4.0, alpha_high=32.0,
                gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=80.0, bilateral_srgb=13.0,
                bilateral_compat=10.0, confidence=None, downscale=1.0),
    # IRN (Ahn et al., CVPR 2019): hard labels (gt_prob 0.7) at conf_fg_thres 0.30 / conf_bg_thres 0.05
    "irn": dict(iterations=10, unary="labels", gt_prob=0.7, background="constant",
                bg_threshold=0.30, bg_low_threshold=0.05, gaussian_sxy=3.0, gaussian_compat=3.0,
                bilateral_sxy=50.0, bilateral_srgb=5.0, bilateral_compat=10.0, confidence=None,
                downscale=1.0),
    # CLIP-ES (Lin et al., CVPR 2023): bg = (1 - max M)^1, posterior < 0.95 -> 255
    "clip_es": dict(iterations=10, unary="scores", background="power", alpha=1.0,
                    gaussian_sxy=1.0, gaussian_compat=3.0, bilateral_sxy=67.0, bilateral_srgb=3.0,
                    bilateral_compat=4.0, confidence=0.95, downscale=1.0),
    # ToCo (Ru et al., CVPR 2023): its DenseCRF defaults; background rule ours (power, alpha 1)
    "toco": dict(iterations=10, unary="scores", background="power", alpha=1.0,
                 gaussian_sxy=1.0, gaussian_compat=1.0, bilateral_sxy=121.0, bilateral_srgb=5.0,
                 bilateral_compat=4.0, confidence=None, downscale=1.0),
    # MCIS / OAA (Jiang et al., ICCV 2019) gen_gt.py: maps + saliency, no CRF
    # (pipeline.oaa_rules); needs crf.saliency_dir
    "oaa": dict(method="oaa", fg_threshold=0.3, conflict=0.99, att_threshold=0.95,
                saliency_ignore=32 / 255, min_foreground=0.01),
}


def resolve_params(crf: "CRFConfig | None" = None, **overrides: Any) -> CRFParams:
    """The preset named by ``crf.preset`` with every non-None field of ``crf`` (and then the
    keyword ``overrides``) replacing the preset's value; inconsistent combinations raise
    :class:`ValueError` naming the ``crf.`` fields."""
    if crf is None:
        from pipeline.config import CRFConfig

        crf = CRFConfig()
    values = dict(PRESETS[crf.preset])
    names = {f.name for f in dataclasses.fields(CRFParams)}
    for name in names:
        value = getattr(crf, name, None)
        if value is not None:
            values[name] = value
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"unknown CRF parameter(s): {', '.join(sorted(unknown))}")
    values.update(overrides)
    params = CRFParams(**values)
    if params.method == "oaa" and crf.saliency_dir is None:
        raise ValueError("crf.preset=oaa (the official MCIS pseudo-GT rules) needs saliency maps: set "
                         "crf.saliency_dir to a directory of <id>.png saliency maps")
    if params.background == "power" and crf.bg_low_threshold is not None:
        raise ValueError("crf.bg_low_threshold applies to background=constant; with the power "
                         "background set crf.alpha_high for the confident-background run (switching "
                         "from the irn preset: also set crf.bg_threshold and crf.bg_low_threshold "
                         "to null)")
    if params.background == "constant" and crf.alpha_high is not None:
        raise ValueError("crf.alpha_high applies to background=power; with the constant "
                         "background set crf.bg_low_threshold for the confident-background run "
                         "(switching to the irn preset: also set crf.alpha and crf.alpha_high to null)")
    if params.background == "power" and params.alpha_high is not None and params.alpha_high < params.alpha:
        raise ValueError(f"crf.alpha_high ({params.alpha_high}) must be >= crf.alpha ({params.alpha}): "
                         "the second run must have the weaker background")
    if params.background == "constant" and params.bg_low_threshold is not None \
            and params.bg_low_threshold > params.bg_threshold:
        raise ValueError(f"crf.bg_low_threshold ({params.bg_low_threshold}) must be <= "
                         f"crf.bg_threshold ({params.bg_threshold}): the second run must have the "
                         "weaker background")
    return params
