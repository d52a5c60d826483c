"""safedpo: SafeDPO and the DPO family on a small, fast transformer engine (a Rust extension).

``Engine`` holds a policy (trainable) and a reference (frozen) on one device and gives back per-pair
log-probs, losses of any objective, training steps and checkpoints; ``train`` runs the trainer from a
TRL-style ``DPOConfig`` dict. Results are dicts of float32 NumPy arrays, in the order of the pairs
given. A Rust error is raised as ``RuntimeError`` (bad arguments: ``ValueError`` / ``TypeError``)
with the Rust message. Long calls release the GIL.

A pair is a dict ``{"prompt", "chosen", "rejected", "chosen_unsafe"?, "rejected_unsafe"?}`` or a
tuple ``(prompt, chosen, rejected[, chosen_unsafe, rejected_unsafe])``; ``*_unsafe`` are SafeDPO's
safety labels (``True`` = unsafe; default ``False``). An unpaired example (KTO's rows, for
``unpaired_loss`` and ``unpaired_train_step``) is a dict ``{"prompt", "completion", "label",
"completion_unsafe"?}`` or a tuple ``(prompt, completion, label[, completion_unsafe])``; ``label`` is
``True`` for a desirable completion.
"""

from os import PathLike
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, TypedDict, Union

import numpy as np
import numpy.typing as npt

__version__: str

Pair = Union[Mapping[str, Union[str, bool]], Tuple[str, str, str], Tuple[str, str, str, bool, bool]]
Example = Union[Mapping[str, Union[str, bool]], Tuple[str, str, bool], Tuple[str, str, bool, bool]]
Path = Union[str, "PathLike[str]"]
Floats = npt.NDArray[np.float32]

class Logps(TypedDict, total=False):
    """Sequence log-probs (the sum over the response tokens, EOS included), one value per pair.
    The ``reference_*`` keys are there when the engine has a reference."""

    policy_chosen: Floats
    policy_rejected: Floats
    reference_chosen: Floats
    reference_rejected: Floats

class Loss(Logps, total=False):
    """``Engine.loss``: the mean loss, each pair's loss and metrics, and the log-probs it read."""

    objective: str
    loss: float
    losses: Floats
    rewards_chosen: Floats
    rewards_rejected: Floats
    margins: Floats
    accuracies: Floats
    accuracy: float

class Step(TypedDict):
    """``Engine.train_step``: the step's number, mean loss, gradient norm (before clipping) and
    learning rate; the policy's log-probs and each pair's metrics before the update."""

    step: int
    loss: float
    grad_norm: float
    lr: float
    policy_chosen: Floats
    policy_rejected: Floats
    losses: Floats
    rewards_chosen: Floats
    rewards_rejected: Floats
    margins: Floats
    accuracies: Floats
    accuracy: float

class UnpairedLoss(TypedDict):
    """``Engine.unpaired_loss``: the mean loss, KTO's KL estimate of the batch (0 for
    ``apo_zero_unpaired``), and per example its loss (weighted by ``desirable_weight`` or
    ``undesirable_weight``), its reward ``beta * (policy - reference)`` and the policy's log-prob."""

    objective: str
    loss: float
    kl: float
    losses: Floats
    rewards: Floats
    policy_logps: Floats

class UnpairedStep(TypedDict):
    """``Engine.unpaired_train_step``: the step's number, mean loss, KL estimate, gradient norm (before
    clipping) and learning rate; per example its loss, reward and policy log-prob before the update."""

    step: int
    loss: float
    kl: float
    grad_norm: float
    lr: float
    losses: Floats
    rewards: Floats
    policy_logps: Floats

class Tokens(TypedDict):
    prompt: List[int]
    chosen: List[int]
    rejected: List[int]

class Engine:
    """A policy and a reference on one device.

    ``device``: ``"auto"`` (GPU 0 when usable, else the CPU; ``fallback_reason`` says why), ``"cpu"``,
    ``"cuda"`` or ``"emu"`` (the emulated CUDA device). ``precision``: ``"f32"`` or ``"bf16"``; by
    default the device's (f32 on the CPU and the emulator, bf16 with fp32 masters on a GPU).
    """

    def __init__(self, device: str = "auto", precision: Optional[str] = None) -> None: ...
    @property
    def device(self) -> str:
        """``cpu``, ``cuda`` or ``emu`` (never ``auto``)."""
    @property
    def precision(self) -> str:
        """``f32`` or ``bf16``."""
    @property
    def fallback_reason(self) -> Optional[str]:
        """Why ``device="auto"`` ran on the CPU, when it did."""
    @property
    def backend_name(self) -> str: ...
    @property
    def steps_taken(self) -> int:
        """Optimizer steps taken since the policy was loaded."""
    @property
    def policy_config(self) -> Optional[Dict[str, Any]]:
        """The policy's HF ``config.json``, once one is loaded."""
    @property
    def objective(self) -> str:
        """The training objective, as text (``safedpo:beta=0.1,delta=10`` by default)."""
    def load_policy(self, path: Path) -> None:
        """The trainable policy from a HF model directory, with its tokenizer (and the template and
        ``max_len`` a safedpo checkpoint was trained with)."""
    def load_reference(self, path: Path) -> None:
        """The frozen reference from a HF model directory (its tokenizer must equal the policy's)."""
    def random_policy(self, config: Optional[Mapping[str, Any]] = None, seed: int = 0) -> None:
        """A randomly initialised policy: ``config`` is a HF ``config.json`` dict (``model_type``
        defaults to ``gpt2``; a GPT-2 leaves out what it likes of ``vocab_size=258, n_positions=128,
        n_embd=32, n_layer=2, n_head=2``); none: that tiny GPT-2 over the byte tokenizer."""
    def random_reference(self, config: Optional[Mapping[str, Any]] = None, seed: int = 0) -> None:
        """A randomly initialised frozen reference (see ``random_policy``)."""
    def reference_from_policy(self) -> None:
        """A frozen copy of the policy's current weights as the reference."""
    def set_template(self, template: str) -> None:
        """The prompt template; it must hold ``{prompt}`` once."""
    def set_max_len(self, max_len: Optional[int] = None) -> None:
        """The longest sequence tokenisation keeps (``None``: the policy's context)."""
    def tokenize(self, pairs: Sequence[Pair]) -> List[Tokens]:
        """The token ids of each pair's prompt (templated) and responses (with EOS)."""
    def logps(self, pairs: Sequence[Pair]) -> Logps:
        """The policy's (and the reference's) sequence log-probs of each pair's responses."""
    def loss(self, pairs: Sequence[Pair], objective: Union[str, Sequence[str], None] = None, **params: Any) -> Loss:
        """Each pair's loss under ``objective`` (any of safedpo's names or TRL's ``loss_type``s, a list
        for a combination) with ``params`` (``beta``, ``delta``, ``safety_margin``, ``loss_weights``,
        TRL's ``ld_alpha`` and ``use_weighting``, ...); none: the training objective. Takes no
        gradient."""
    def unpaired_loss(
        self, examples: Sequence[Example], objective: Optional[str] = None, **params: Any
    ) -> UnpairedLoss:
        """Each unpaired example's loss under ``objective`` (``"kto"`` or ``"apo_zero_unpaired"``)
        with ``params`` (``beta``, ``desirable_weight``, ``undesirable_weight``, ``safety_margin``);
        none: the training objective. The examples are one batch: KTO's KL estimate is formed from
        their KL sequences (each prompt with the previous example's completion). Takes no gradient."""
    def set_objective(self, objective: Union[str, Sequence[str]], **params: Any) -> None:
        """The objective ``train_step`` minimises (default SafeDPO, beta 0.1, delta 10)."""
    def set_optimizer(
        self,
        lr: float = 1e-5,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        grad_clip: float = 1.0,
    ) -> None:
        """AdamW's settings and the grad-norm clip (0: none); before the first step."""
    def train_step(self, pairs: Sequence[Pair], lr: Optional[float] = None) -> Step:
        """One optimizer step on the pairs' mean loss (at ``lr``, default the optimizer's)."""
    def accumulated_step(self, micro_batches: Sequence[Sequence[Pair]], lr: Optional[float] = None) -> Step:
        """One optimizer step whose gradient is accumulated over the micro-batches, run one after
        another: the mean loss over all their pairs."""
    def unpaired_train_step(self, examples: Sequence[Example], lr: Optional[float] = None) -> UnpairedStep:
        """One optimizer step on the unpaired examples' mean loss (one batch) under the training
        objective, which must be ``kto`` or ``apo_zero_unpaired`` (at ``lr``, default the
        optimizer's)."""
    def save(self, path: Path) -> None:
        """The policy as a HF model directory (with its tokenizer, and the optimizer state once it
        has trained)."""

def train(config: Mapping[str, Any]) -> Dict[str, Any]:
    """Preference training from a TRL-style ``DPOConfig`` dict.

    TRL's keys map onto safedpo's settings as README's DPOConfig table says (``beta``,
    ``loss_type``, ``learning_rate``, ``num_train_epochs`` / ``max_steps``,
    ``per_device_train_batch_size``, ``gradient_accumulation_steps``, ``max_length``,
    ``output_dir``, ...); safedpo's own are ``delta`` / ``safety_margin``, ``model_name_or_path``,
    ``ref_model``, ``data_path``, ``eval_data_path``, ``data_format``, ``template``, and any setting
    by its path (``"objective.delta"``, ``"device"``). ``resume_from_checkpoint`` and
    ``overwrite_output_dir`` say how the run starts. An unknown key raises ``ValueError`` naming it.
    Returns the run's summary (``out_dir``, ``steps``, ``checkpoint``, ``eval``, ...).
    """
