"""The built-in merge methods, registered through ``adaptkit_register_mergers`` like any plugin's.

Nothing here imports torch: ``impl`` strings are resolved when a method is first used. Parameter names,
scopes and defaults follow mergekit 0.1.5 so its YAML configs keep their meaning; extra parameters select
the paper variants. Formulas and defaults: specs/merge-math.md.

What the engine may do with a method is declared here (``row_separable``, ``propagates_nonfinite``,
``in_place``, ``identity_params``; see :class:`adaptkit.registry.MergeMethod`), never inferred from its name.
"""
from __future__ import annotations

from adaptkit import hookimpl
from adaptkit.registry import REQUIRED, MergeMethod, Param

_M = "adaptkit.merge"

WEIGHT = Param(
    "weight", float, REQUIRED, scope="both",
    help="weight of the model's contribution (per model; a top-level value applies to every model)",
)
DENSITY = Param(
    "density", float, 1.0, scope="both", min=0.0, min_exclusive=True, max=1.0,
    help="fraction of each task vector's entries kept (1 = no sparsification, no rescale)",
)
LAMBDA = Param("lambda", float, 1.0, scope="global", help="scale of the merged task vector")
INT8_MASK = Param(
    "int8_mask", bool, False, scope="global", gradient=False,
    help="accepted for mergekit compatibility; no effect (masks are always boolean)",
)
RESCALE_MODE = Param(
    "rescale_mode", str, "l1", scope="global", choices=("l1", "inverse_p"), gradient=False,
    help="with rescale: 'l1' matches the L1 norm of the unpruned task vector (mergekit); 'inverse_p' "
    "divides each kept entry by its keep probability (DARE/DELLA papers)",
)
NORMALIZE_BY = Param(
    "normalize_by", str, "weight", scope="global", choices=("weight", "count"), gradient=False,
    help="with normalize: divide by the sum of the (agreeing) models' weights (mergekit) or by their "
    "number (TIES paper's disjoint mean)",
)
CONSENSUS = Param(
    "consensus_method", str, "sum", scope="global", choices=("sum", "count"), gradient=False,
    help="sign election: sign of the summed task vectors (TIES paper, mergekit) or majority of signs",
)
SIGN_ELECTION = Param(
    "sign_election", str, "weighted", scope="global", choices=("weighted", "unweighted"), gradient=False,
    help="elect signs on weight-scaled task vectors (mergekit) or on unscaled ones (TIES paper)",
)
ELECTION_PRECISION = Param(
    "election_precision", str, "float64", scope="global", choices=("float64", "compute"), gradient=False,
    help="sign election score summed in float64 from exact products (an exactly cancelling score elects +1) "
    "or in the compute dtype from rounded weighted deltas (mergekit)",
)
TIEBREAK = Param(
    "magnitude_tiebreak", str, "index", scope="global", choices=("index", "sort"), gradient=False,
    help="equal magnitudes at the trim threshold: lower flat index kept first (exact k, threshold "
    "selection) or torch.argsort's order (mergekit 0.1.5; a full sort)",
)
GAMMA = Param(
    "gamma", float, 0.01, scope="both", min=0.0, max=1.0,
    help="breadcrumbs: fraction of largest-magnitude entries removed as outliers",
)
EPSILON = Param(
    "epsilon", float, 0.15, scope="both", min=0.0, max=0.5,
    help="della: keep probabilities range over density +/- epsilon by magnitude rank",
)


def _normalize(default: bool) -> Param:
    return Param(
        "normalize", bool, default, scope="global", gradient=False,
        help="divide the merged task vector by the sum of weights (see normalize_by)",
    )


def _rescale(default: bool) -> Param:
    return Param(
        "rescale", bool, default, scope="global", gradient=False,
        help="rescale each sparsified task vector (see rescale_mode)",
    )


def _gta(name, func, *, normalize, rescale, consensus, extra=(), randomized=False, row_separable=False,
         description=""):
    params = [WEIGHT, DENSITY, _normalize(normalize), _rescale(rescale), RESCALE_MODE, NORMALIZE_BY, LAMBDA, INT8_MASK]
    if consensus:
        params += [CONSENSUS, SIGN_ELECTION, ELECTION_PRECISION]
    params += list(extra)
    return MergeMethod(
        name=name,
        impl=f"{_M}.task_arithmetic:{func}",
        params=tuple(params),
        requires_base=True,
        randomized=randomized,
        min_models=1,
        row_separable=row_separable,
        in_place=True,  # task vectors computed in the engine's own upcast copies, the result written into base
        description=description,
    )


BUILTIN_METHODS: tuple[MergeMethod, ...] = (
    MergeMethod(
        name="linear",
        impl=f"{_M}.linear:linear",
        params=(WEIGHT, Param("normalize", bool, True, scope="global", gradient=False,
                              help="divide by the sum of the weights")),
        requires_base=False,
        uses_base=False,
        min_models=1,
        row_separable=True,
        propagates_nonfinite=True,  # sum_i w_i x_i: NaN/Inf in any input (even with weight 0) reaches the result
        description="weighted average of the models (model soups)",
    ),
    MergeMethod(
        name="slerp",
        impl=f"{_M}.slerp:slerp",
        params=(Param("t", float, REQUIRED, scope="global", min=0.0, max=1.0,
                      help="interpolation from the base model (0) to the other model (1)"),),
        requires_base=True,
        min_models=1,
        max_models=1,
        description="spherical interpolation between the base model and one other model",
    ),
    MergeMethod(
        name="nuslerp",
        impl=f"{_M}.slerp:nuslerp",
        params=(
            WEIGHT,
            Param("nuslerp_flatten", bool, True, scope="global", gradient=False,
                  help="interpolate whole tensors as single vectors (else per row or column)"),
            Param("nuslerp_row_wise", bool, False, scope="global", gradient=False,
                  help="without flatten: interpolate dim-0 vectors instead of last-dim vectors"),
        ),
        requires_base=False,
        min_models=2,
        max_models=2,
        description="spherical interpolation of two models (of their task vectors if a base is given)",
    ),
    _gta("task_arithmetic", "task_arithmetic", normalize=False, rescale=False, consensus=False,
         row_separable=f"{_M}.task_arithmetic:rows_independent",
         description="base + lambda * weighted sum of task vectors"),
    _gta("ties", "ties", normalize=True, rescale=False, consensus=True, extra=(TIEBREAK,),
         description="TIES: magnitude trim, sign election, disjoint merge"),
    _gta("dare_ties", "dare_ties", normalize=False, rescale=True, consensus=True, randomized=True,
         description="DARE random drop and rescale, TIES sign election"),
    _gta("dare_linear", "dare_linear", normalize=False, rescale=True, consensus=False, randomized=True,
         description="DARE random drop and rescale, weighted sum"),
    _gta("breadcrumbs", "breadcrumbs", normalize=False, rescale=False, consensus=False, extra=(GAMMA, TIEBREAK),
         description="Model Breadcrumbs: drop outliers and small entries, weighted sum"),
    _gta("breadcrumbs_ties", "breadcrumbs_ties", normalize=False, rescale=False, consensus=True,
         extra=(GAMMA, TIEBREAK),
         description="Model Breadcrumbs trim with TIES sign election"),
    _gta("della", "della", normalize=True, rescale=True, consensus=True, extra=(EPSILON,), randomized=True,
         description="DELLA: magnitude-ranked random drop, rescale, TIES sign election"),
    _gta("della_linear", "della_linear", normalize=False, rescale=True, consensus=False, extra=(EPSILON,),
         randomized=True, description="DELLA drop and rescale, weighted sum"),
    MergeMethod(
        name="model_stock",
        impl=f"{_M}.model_stock:model_stock",
        params=(Param("filter_wise", bool, False, scope="global", gradient=False,
                      help="one interpolation ratio per row instead of per tensor"),),
        requires_base=True,
        min_models=2,
        description="Model Stock: interpolate the average towards the base by the models' angle",
    ),
    MergeMethod(
        name="sce",
        impl=f"{_M}.sce_ram:sce",
        params=(
            Param("select_topk", float, 1.0, scope="global", min=0.0, max=1.0,
                  help="fraction of positions kept by variance across the task vectors (1 = all)"),
            Param("sce_weight_guard", float, 1e-6, scope="global", min=0.0,
                  help="weigh models equally when the sum of their mean squared task vectors is below this "
                  "(mergekit's guard; 0 always uses the paper's weights)"),
            INT8_MASK,
        ),
        requires_base=True,
        min_models=1,
        description="SCE (FuseChat): variance select, mean-square weights, TIES sign erase",
    ),
    MergeMethod(
        name="ram",
        impl=f"{_M}.sce_ram:ram",
        params=(Param("epsilon", float, 1e-5, scope="global", min=0.0,
                      help="a task-vector entry contributes when its magnitude exceeds this"),),
        requires_base=True,
        min_models=1,
        row_separable=True,
        description="RAM: unique task-vector entries kept, shared ones averaged",
    ),
    MergeMethod(
        name="ramplus_tl",
        impl=f"{_M}.sce_ram:ramplus_tl",
        params=(
            Param("r", float, 0.1, scope="global", help="strength of the rescale of unique contributions"),
            Param("alpha", float, 0.2, scope="global", min=0.0, help="upper clamp of the shared/unique ratio"),
            Param("epsilon", float, 1e-5, scope="global", min=0.0,
                  help="a task-vector entry contributes when its magnitude exceeds this"),
        ),
        requires_base=True,
        min_models=1,
        description="RAM+ (tensor-local): RAM with each model's unique entries rescaled by its overlap ratio",
    ),
    MergeMethod(
        name="multislerp",
        impl=f"{_M}.spherical:multislerp",
        params=(
            WEIGHT,
            Param("normalize_weights", bool, True, scope="global", gradient=False,
                  help="divide the weights by their sum"),
            Param("eps", float, 1e-8, scope="global", min=0.0, help="added to norms (numerical stability)"),
        ),
        requires_base=False,
        min_models=1,
        description="spherical barycentric interpolation of several models (of task vectors with a base)",
    ),
    MergeMethod(
        name="karcher",
        impl=f"{_M}.spherical:karcher",
        params=(
            Param("max_iter", int, 10, scope="global", min=0, gradient=False,
                  help="maximum fixed-point iterations"),
            Param("tol", float, 1e-5, scope="global", min=0.0, help="convergence tolerance"),
        ),
        requires_base=False,
        uses_base=False,
        min_models=1,
        description="Karcher (Riemannian) mean of the models' directions, at their mean norm",
    ),
    MergeMethod(
        name="nearswap",
        impl=f"{_M}.selective:nearswap",
        params=(Param("t", float, REQUIRED, scope="global", min=0.0,
                      help="entries closer than about t take the other model's value"),),
        requires_base=True,
        min_models=1,
        max_models=1,
        row_separable=True,
        description="interpolate towards the other model where it is close to the base",
    ),
    MergeMethod(
        name="arcee_fusion",
        impl=f"{_M}.selective:arcee_fusion",
        params=(),
        requires_base=True,
        min_models=1,
        max_models=1,
        description="Arcee Fusion: take the other model's entries of outlying importance (|delta| x KL)",
    ),
    MergeMethod(
        name="passthrough",
        impl=f"{_M}.linear:passthrough",
        params=(Param("scale", float, 1.0, scope="both", help="multiply the tensor by this factor"),),
        requires_base=False,
        uses_base=False,
        min_models=1,
        max_models=1,
        identity_params=(("scale", 1.0),),  # scale 1: the tensor is copied as stored, without any math
        description="copy the tensor of the single model (frankenmerge slices)",
    ),
)


@hookimpl
def adaptkit_register_mergers(registry):  # registry: adaptkit.registry.MergerRegistry
    for method in BUILTIN_METHODS:
        registry.register(method)
