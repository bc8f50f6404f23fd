"""The ``adaptkit`` entry point of adaptkit-trl: registers trainers and GRPO rewards.

Imports nothing heavy: implementations are named lazily (``"module:function"``), so ``adaptkit --help`` and
``adaptkit plugins`` never import torch or TRL.
"""
from __future__ import annotations

from adaptkit import hookimpl
from adaptkit.registry import Param, Trainer

_PEFT = ("lora", "qlora", "dora", "rslora")
ALL_KINDS = ("full", "lora", "qlora", "dora", "rslora", "adalora", "ia3", "prompt_tuning", "prefix_tuning")

TRAINERS = (
    Trainer(
        name="sft", impl="adaptkit_trl.methods:sft",
        description="supervised fine-tuning (TRL SFTTrainer): chat messages, prompt/completion or plain text",
        data_formats=("messages", "prompt_completion", "text"), adapters=ALL_KINDS, distributed=True,
        params=(
            Param("assistant_only_loss", bool, True, scope="global",
                  help="messages rows: loss on assistant turns only (masks from the chat template)"),
            Param("completion_only_loss", bool, True, scope="global",
                  help="prompt/completion rows: loss on the completion only"),
            Param("pad_token", str, "", scope="global",
                  help="use this token for padding (e.g. when pad == eos); empty: the tokenizer's"),
        ),
    ),
    Trainer(
        name="dpo", impl="adaptkit_trl.methods:dpo",
        description="Direct Preference Optimization (TRL DPOTrainer) on prompt/chosen/rejected rows",
        data_formats=("preference",), adapters=("full", *_PEFT), needs_reference=True, distributed=True,
        params=(
            Param("beta", float, 0.1, scope="global", min=0.0, min_exclusive=True, help="KL strength"),
            Param("loss_type", str, "sigmoid", scope="global",
                  choices=("sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero",
                           "apo_down", "discopop", "sft"), help="DPO loss variant"),
            Param("label_smoothing", float, 0.0, scope="global", min=0.0, max=0.5),
        ),
    ),
    Trainer(
        name="kto", impl="adaptkit_trl.methods:kto",
        description="Kahneman-Tversky Optimization (TRL KTOTrainer) on prompt/completion/label rows",
        data_formats=("unpaired_preference",), adapters=("full", *_PEFT), needs_reference=True, distributed=True,
        params=(
            Param("beta", float, 0.1, scope="global", min=0.0, min_exclusive=True),
            Param("desirable_weight", float, 1.0, scope="global", min=0.0, min_exclusive=True),
            Param("undesirable_weight", float, 1.0, scope="global", min=0.0, min_exclusive=True),
        ),
    ),
    Trainer(
        name="orpo", impl="adaptkit_trl.methods:orpo",
        description="Odds Ratio Preference Optimization (trl.experimental.orpo), reference-free",
        data_formats=("preference",), adapters=("full", *_PEFT), distributed=True,
        params=(Param("beta", float, 0.1, scope="global", min=0.0, min_exclusive=True, help="odds-ratio weight (lambda)"),),
    ),
    Trainer(
        name="simpo", impl="adaptkit_trl.methods:simpo",
        description="Simple Preference Optimization (trl.experimental.cpo, loss_type=simpo), reference-free",
        data_formats=("preference",), adapters=("full", *_PEFT), distributed=True,
        params=(
            Param("beta", float, 2.0, scope="global", min=0.0, min_exclusive=True, help="reward scale"),
            Param("gamma", float, 0.5, scope="global", min=0.0, help="target reward margin (simpo_gamma)"),
            Param("cpo_alpha", float, 0.0, scope="global", min=0.0, help="weight of the NLL term (0: pure SimPO)"),
        ),
    ),
    Trainer(
        name="grpo", impl="adaptkit_trl.methods:grpo",
        description="Group Relative Policy Optimization (TRL GRPOTrainer) with rewards from the reward registry",
        data_formats=("prompt",), adapters=("full", *_PEFT), needs_reward=True,
        params=(
            Param("num_generations", int, 4, scope="global", min=2, help="completions per prompt (a group)"),
            Param("max_completion_length", int, 64, scope="global", min=1, help="tokens generated per completion"),
            Param("temperature", float, 1.0, scope="global", min=0.0, min_exclusive=True),
            Param("beta", float, 0.0, scope="global", min=0.0, help="KL weight (0: no reference model)"),
        ),
    ),
    Trainer(
        name="reward", impl="adaptkit_trl.methods:reward",
        description="reward model (TRL RewardTrainer): a sequence-classification head scoring chosen > rejected",
        data_formats=("preference",), adapters=("full", "lora", "dora", "rslora"), distributed=True,
        params=(Param("center_rewards_coefficient", float, 0.0, scope="global", min=0.0,
                      help="pull the mean reward towards 0"),),
    ),
)


@hookimpl
def adaptkit_register_trainers(registry) -> None:  # noqa: ANN001
    for t in TRAINERS:
        registry.register(t)


@hookimpl
def adaptkit_register_rewards(registry) -> None:  # noqa: ANN001
    from adaptkit_trl.rewards import REWARDS

    for r in REWARDS:
        registry.register(r)
