"""Registers the ``median`` merge method. Imports no torch: the implementation is referenced lazily."""
from adaptkit import hookimpl
from adaptkit.registry import MergeMethod, Param


@hookimpl
def adaptkit_register_mergers(registry):
    registry.register(
        MergeMethod(
            name="median",
            impl="adaptkit_example_merge.median:merge_median",
            description="Element-wise median of the models (of their task vectors when a base model is given).",
            params=(
                Param("scale", float, default=1.0, scope="global", min=0.0, max=10.0,
                      help="Multiplier of the median task vector (only with a base model)."),
            ),
            requires_base=False,
            min_models=2,
        )
    )
