"""`nanoserve check`: where, layer by layer, a checkpoint and a kernel set depart from Hugging Face.

The same prompts run through nanoserve (with the kernel spec in force, plug-ins included) and
through `transformers.Qwen3ForCausalLM` on the same device and dtype. HF first generates a greedy
continuation of each prompt; then both models see prompt + continuation, nanoserve as a prefill of
the prompt followed by one decode step per continuation token (so prefill and decode attention
both run), HF as one forward. Compared at every position: the hidden state after each decoder
layer (max and mean |Δ|, the worst token's cosine), and the logits (max |Δ|, KL(HF ‖ nanoserve),
top-1 agreement, top-5 overlap, the prompt tokens' logprobs). The greedy match length is how many
continuation tokens nanoserve's argmax reproduces before the first miss: as the decode steps are
fed HF's tokens, that is exactly where a free-running nanoserve would leave HF's text.

Each dtype has stated thresholds (`THRESHOLDS`). On failure the first layer past its threshold is
re-run with HF's input to that layer and each suspect op in turn on its reference (norm: the
torch RMSNorm; attention front-end: q/k norm, RoPE and the K/V store in torch; attention: the
torch paged attention; MLP: HF's own MLP module of that layer): the op whose reference brings the
layer back under its threshold is named.
"""

import argparse
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from nanoserve_kernels import get_backend, set_backend
from nanoserve_kernels.backend import parse_backend, plugin_targets
from nanoserve_kernels.plugins import PluginCheckFailed
from model.batch import SequenceStep, make_batch
from model.config import load_config
from model.load import check_kernel_plugins, load_model, model_dir_or_demo, resolve_device, resolve_dtype
from model.qwen3 import Qwen3Model
from model.tokenizer import Tokenizer

BLOCK_SIZE = 16
DEFAULT_PROMPTS: list[str | list[dict]] = [
    "Hello",
    "The quick brown fox jumps over the lazy dog. " * 12 + "Summarise the sentence above in one word:",
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    "Der Zug nach Zürich fährt um 7 Uhr. 東京の天気は晴れです。 Москва — столица России. مرحبا بالعالم",
]


@dataclass(frozen=True)
class Thresholds:
    """What passes, per dtype. Layer and logit differences are relative to the reference's largest
    magnitude at that point (hidden states grow layer by layer)."""

    layer_rel_max: float  # max |Δ| of a layer's output / max |HF's|
    layer_min_cosine: float  # every token's cosine to HF at every layer at least this
    logits_rel_max: float  # max |Δ| of the logits / max |HF's|
    max_kl: float  # KL(HF ‖ nanoserve) at every position at most this (nats)
    min_top1: float  # share of positions whose argmax agrees
    full_greedy_match: bool  # every continuation token reproduced


# fp32: summation order alone; healthy runs measured ~3e-7 (layers) and ~1e-7 (logits) relative,
# KL ~1e-12, on the demo and test checkpoints. bf16: a healthy run of the demo checkpoint measured
# layers 1.1e-2 relative, worst cosine 0.99998, logits 4.3e-3, KL up to 3.6e-4, top-1 98.4%
# (bf16 rounds to 2^-8 relative; HF and nanoserve round at different points), and with the Triton
# kernels through the interpreter (which truncates bf16 where a GPU rounds) 2.1e-2, 0.99993,
# 1.3e-2, 3.3e-3, 94.9%; the thresholds allow about twice the latter. fp16 rounds 8x finer than bf16: its thresholds are bf16's scaled by that
# (KL by its square), not measured.
THRESHOLDS = {
    torch.float32: Thresholds(1e-4, 0.99999, 1e-4, 1e-6, 1.0, True),
    torch.float16: Thresholds(6e-3, 0.9999, 3e-3, 2e-4, 0.95, False),
    torch.bfloat16: Thresholds(5e-2, 0.999, 2.5e-2, 1e-2, 0.9, False),
}
# Suspects in the order a layer runs them: name, the ops set to torch for it (None: HF's MLP module).
SUSPECTS: list[tuple[str, tuple[str, ...] | None]] = [
    ("norm", ("rms_norm",)),
    ("attention front-end", ("attention_frontend", "rope", "store_kv")),
    ("attention", ("decode_attention", "prefill_attention")),
    ("MLP", None),
]


@dataclass
class LayerStats:
    layer: int
    max_abs: float
    mean_abs: float
    min_cosine: float
    rel_max: float  # max_abs / max |HF|

    def passes(self, t: Thresholds) -> bool:
        return self.rel_max <= t.layer_rel_max and self.min_cosine >= t.layer_min_cosine


@dataclass
class LogitStats:
    max_abs: float
    rel_max: float
    mean_kl: float
    max_kl: float
    top1: float
    top5_overlap: float
    prompt_logprob_max_abs: float


@dataclass
class Report:
    model: str
    device: str
    dtype: str
    kernels: str
    plugin_check: list[str]  # the load-time check's lines (a failure is reported, and the run goes on),
    # and on CPU the op choices timed at load
    thresholds: dict
    prompts: int
    positions: int
    layers: list[LayerStats]
    logits: LogitStats
    greedy_match: list[tuple[int, int]]  # per prompt: (tokens matched, continuation length)
    failures: list[str] = field(default_factory=list)
    diagnosis: dict | None = None  # first failing layer and the op found on re-running it

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class Run:
    """One model's hidden states (one [N, hidden] per layer) and logits [N, vocab] over every
    compared position of every prompt, prompts one after the other."""

    hidden: list[torch.Tensor]
    logits: torch.Tensor


@dataclass
class Prompt:
    ids: list[int]  # prompt tokens
    continuation: list[int]  # HF's greedy tokens


def add_check_parser(sub: argparse._SubParsersAction, add_model_flags: Callable) -> None:
    check = sub.add_parser("check", help="compare nanoserve with transformers on a checkpoint, layer by layer")
    add_model_flags(check)
    check.add_argument("--prompts", default=None, metavar="FILE",
                       help="prompts, one per line, run as raw text (default: built-in short, long, "
                       "chat-templated and multilingual ones)")
    check.add_argument("--max-tokens", type=int, default=16,
                       help="greedy continuation tokens to compare per prompt (default 16)")
    check.add_argument("--json", default=None, metavar="PATH", help="also write every number to PATH as JSON")


def check_main(args: argparse.Namespace) -> int:
    """Prints the comparison; 0 when every threshold holds, 1 when one does not."""
    model_dir = model_dir_or_demo(args.model)
    prompts_text = _read_prompts(args.prompts) if args.prompts else DEFAULT_PROMPTS
    report = run_check(model_dir, args.device, args.dtype, prompts_text, args.max_tokens)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report) | {"passed": report.passed}, indent=1) + "\n")
    return 0 if report.passed else 1


def _read_prompts(path: str) -> list[str]:
    try:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as err:
        raise ValueError(f"--prompts {path}: {err.strerror}") from None
    if not lines:
        raise ValueError(f"--prompts {path}: no prompts in it (one per line)")
    return lines


def run_check(model_dir: str | Path, device: str, dtype: str, prompts: list[str | list[dict]],
              max_tokens: int) -> Report:
    import transformers  # the reference, imported only here

    transformers.utils.logging.disable_progress_bar()

    config = load_config(model_dir)
    tokenizer = Tokenizer(model_dir)
    encoded = [tokenizer.encode_chat(p) if isinstance(p, list) else tokenizer.encode(p) for p in prompts]
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, config.dtype, torch_device)
    try:  # a plug-in that fails its load-time check is still run: this is where to see what it does
        check_kernel_plugins(config, torch_device, torch_dtype, BLOCK_SIZE)
        plugin_check = [f"load-time check passed: {op}" for op in _plugin_ops()]
    except PluginCheckFailed as err:
        plugin_check = [f"load-time check FAILED: {err}"]
    ours = load_model(model_dir, torch_device.type, str(torch_dtype).removeprefix("torch."), check_kernels=False)
    if torch_device.type == "cpu":  # the CPU op choices the engine makes too (model.cpu_plan)
        plugin_check.append(ours.plan_cpu_ops(1, max(len(ids) for ids in encoded) + max_tokens).describe())
    hf = transformers.Qwen3ForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(torch_device).eval()
    cases = [Prompt(ids, _hf_greedy(hf, ids, max_tokens)) for ids in encoded]
    reference, mine = _run_hf(hf, cases), _run_ours(ours, cases)
    thresholds = THRESHOLDS[torch_dtype]
    report = Report(
        model=str(model_dir), device=torch_device.type, dtype=str(torch_dtype).removeprefix("torch."),
        kernels=get_backend(), plugin_check=plugin_check, thresholds=asdict(thresholds), prompts=len(cases),
        positions=reference.logits.shape[0], layers=_layer_stats(mine, reference),
        logits=_logit_stats(mine.logits, reference.logits, cases),
        greedy_match=_greedy_match(mine.logits, cases),
    )
    report.failures = _failures(report, thresholds)
    failing = next((s.layer for s in report.layers if not s.passes(thresholds)), None)
    if failing is not None:
        report.diagnosis = _diagnose(ours, hf, cases, reference, failing, thresholds)
    return report


def _plugin_ops() -> list[str]:
    return [f"{op}={target}" for op, target in sorted(plugin_targets().items())]


def _hf_greedy(hf, ids: list[int], max_tokens: int) -> list[int]:
    device = next(hf.parameters()).device
    out = hf.generate(torch.tensor([ids], device=device), max_new_tokens=max_tokens, do_sample=False,
                      eos_token_id=None, pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                                                                                 device=device))
    return out[0, len(ids):].tolist()


@torch.inference_mode()
def _run_hf(hf, cases: list[Prompt]) -> Run:
    """HF over each prompt + its continuation but the last token (whose logits nothing uses)."""
    captured: list[list[torch.Tensor]] = [[] for _ in hf.model.layers]
    hooks = [layer.register_forward_hook(lambda _m, _i, out, i=i: captured[i].append(
        (out[0] if isinstance(out, tuple) else out)[0])) for i, layer in enumerate(hf.model.layers)]
    device = next(hf.parameters()).device
    logits = []
    try:
        for case in cases:
            tokens = (case.ids + case.continuation)[: len(case.ids) + len(case.continuation) - 1]
            logits.append(hf(torch.tensor([tokens], device=device)).logits[0].float())
    finally:
        for hook in hooks:
            hook.remove()
    return Run([torch.cat(states) for states in captured], torch.cat(logits))


@torch.inference_mode()
def _run_ours(model: Qwen3Model, cases: list[Prompt], inject: dict[int, torch.Tensor] | None = None) -> Run:
    """nanoserve over each prompt (one prefill) and its continuation (one decode step per token,
    fed HF's tokens). `inject` {layer: [N, hidden]} replaces those layers' outputs (the positions
    in the order of `Run`), so that the next layer starts from HF's state."""
    captured: list[list[torch.Tensor]] = [[] for _ in model.layers]
    offset = 0  # rows of the step being run within the whole run

    def hook(index: int, out: torch.Tensor) -> torch.Tensor | None:
        captured[index].append(out.clone())
        if inject is not None and index in inject:
            return inject[index][offset : offset + out.shape[0]].to(out.dtype)
        return None

    logits = []
    model.layer_hook = hook
    try:
        for case in cases:
            total = len(case.ids) + len(case.continuation)
            blocks = list(range(-(-total // BLOCK_SIZE)))
            cache = model.allocate_kv_cache(len(blocks), BLOCK_SIZE)
            step = SequenceStep(case.ids, 0, blocks)
            logits.append(model.forward(make_batch([step], BLOCK_SIZE, model.device, all_logits=True), cache))
            offset += len(case.ids)
            for position, token in enumerate(case.continuation[:-1], start=len(case.ids)):
                batch = make_batch([SequenceStep([token], position, blocks)], BLOCK_SIZE, model.device)
                logits.append(model.forward(batch, cache))
                offset += 1
    finally:
        model.layer_hook = None
    return Run([torch.cat(states) for states in captured], torch.cat(logits).float())


def _layer_stats(mine: Run, reference: Run) -> list[LayerStats]:
    stats = []
    for index, (ours, ref) in enumerate(zip(mine.hidden, reference.hidden)):
        ours, ref = ours.float(), ref.float()
        diff = (ours - ref).abs()
        cosine = torch.nn.functional.cosine_similarity(ours, ref, dim=-1)
        stats.append(LayerStats(index, float(diff.max()), float(diff.mean()), float(cosine.min()),
                                float(diff.max() / ref.abs().max())))
    return stats


def _logit_stats(mine: torch.Tensor, reference: torch.Tensor, cases: list[Prompt]) -> LogitStats:
    diff = (mine - reference).abs()
    # The prompt tokens' logprobs: row t predicts token t + 1 of the prompt.
    targets = torch.full((mine.shape[0],), -1, dtype=torch.long)
    start = 0
    for case in cases:
        targets[start : start + len(case.ids) - 1] = torch.tensor(case.ids[1:], dtype=torch.long)
        start += len(case.ids) + len(case.continuation) - 1
    kl, top5, logprob_diff = [], [], []
    for rows in torch.arange(mine.shape[0]).split(64):  # fp64 [rows, vocab] at a time: a real vocabulary is large
        # In fp64: fp32's own rounding in log_softmax alone gives KLs of 1e-7 between equal models.
        log_p, log_q = reference[rows].double().log_softmax(-1), mine[rows].double().log_softmax(-1)
        kl.append((log_p.exp() * (log_p - log_q)).sum(-1).cpu())
        ours5, ref5 = mine[rows].topk(5, dim=-1).indices, reference[rows].topk(5, dim=-1).indices
        top5.append((ours5[:, :, None] == ref5[:, None, :]).any(-1).float().mean(-1).cpu())
        wanted = targets[rows] >= 0
        picked = targets[rows][wanted].to(mine.device)
        index = torch.arange(len(rows), device=mine.device)[wanted.to(mine.device)]
        logprob_diff.append((log_q[index, picked] - log_p[index, picked]).abs().cpu())
    kl_all, lp = torch.cat(kl), torch.cat(logprob_diff)
    return LogitStats(
        max_abs=float(diff.max()), rel_max=float(diff.max() / reference.abs().max()), mean_kl=float(kl_all.mean()),
        max_kl=float(kl_all.max()), top1=float((mine.argmax(-1) == reference.argmax(-1)).float().mean()),
        top5_overlap=float(torch.cat(top5).mean()), prompt_logprob_max_abs=float(lp.max()) if lp.numel() else 0.0,
    )


def _greedy_match(mine: torch.Tensor, cases: list[Prompt]) -> list[tuple[int, int]]:
    """Per prompt: continuation tokens nanoserve's argmax reproduces before its first miss."""
    matches, start = [], 0
    for case in cases:
        # Row len(ids) - 1 + j predicts continuation token j.
        predicted = mine[start + len(case.ids) - 1 : start + len(case.ids) - 1 + len(case.continuation)].argmax(-1)
        hits = (predicted.cpu() == torch.tensor(case.continuation)).tolist()
        matches.append((hits.index(False) if False in hits else len(hits), len(hits)))
        start += len(case.ids) + len(case.continuation) - 1
    return matches


def _failures(report: Report, t: Thresholds) -> list[str]:
    failures = [f"layer {s.layer}: max |Δ| {s.rel_max:.2e} of the largest value (threshold {t.layer_rel_max:g}), "
                f"worst cosine {s.min_cosine:.6f} (threshold {t.layer_min_cosine:g})"
                for s in report.layers if not s.passes(t)][:1]
    lg = report.logits
    if lg.rel_max > t.logits_rel_max:
        failures.append(f"logits: max |Δ| {lg.rel_max:.2e} of the largest (threshold {t.logits_rel_max:g})")
    if lg.max_kl > t.max_kl:
        failures.append(f"logits: KL(HF ‖ nanoserve) up to {lg.max_kl:.2e} (threshold {t.max_kl:g})")
    if lg.top1 < t.min_top1:
        failures.append(f"logits: top-1 agreement {100 * lg.top1:.1f}% (threshold {100 * t.min_top1:g}%)")
    if t.full_greedy_match and any(matched < total for matched, total in report.greedy_match):
        failures.append("greedy continuation: leaves HF's before its end")
    return failures


def _diagnose(model: Qwen3Model, hf, cases: list[Prompt], reference: Run, layer: int, t: Thresholds) -> dict:
    """Re-runs `layer` from HF's input with each suspect op on its reference; the first whose
    reference brings the layer back under its thresholds is the op named."""
    inject = {layer - 1: reference.hidden[layer - 1]} if layer > 0 else None
    results = {}
    for name, ops in [("none", ()), *SUSPECTS]:
        with _on_reference(model, hf, ops):
            run = _run_ours(model, cases, inject)
        results[name] = _layer_stats(run, reference)[layer]
    found = next((name for name, _ in SUSPECTS if results[name].passes(t)), None)
    return dict(layer=layer, op=found, rel_max={name: s.rel_max for name, s in results.items()},
                min_cosine={name: s.min_cosine for name, s in results.items()})


@contextmanager
def _on_reference(model: Qwen3Model, hf, ops: tuple[str, ...] | None) -> Iterator[None]:
    """The block runs with `ops` on their torch references (None: every layer's MLP is HF's own)."""
    if ops is None:
        hf_mlps = {id(layer): hf_layer.mlp for layer, hf_layer in zip(model.layers, hf.model.layers)}
        model._mlp = lambda layer, x: hf_mlps[id(layer)](x)  # an instance attribute shadows the method
        try:
            yield
        finally:
            del model._mlp
        return
    before = get_backend()
    default, overrides = parse_backend(before)
    set_backend(",".join([default, *(f"{op}={b}" for op, b in overrides.items() if op not in ops),
                          *(f"{op}=torch" for op in ops)]))
    try:
        yield
    finally:
        set_backend(before)


def format_report(report: Report) -> str:
    t = report.thresholds
    lines = [
        f"nanoserve check: {report.model} ({report.dtype} on {report.device}, kernels {report.kernels})",
        *(f"  {line}" for line in report.plugin_check),
        f"  {report.prompts} prompts, {report.positions} positions compared with transformers",
        f"  thresholds ({report.dtype}): layer max |Δ| <= {t['layer_rel_max']:g} x its largest value and every "
        f"token's cosine >= {t['layer_min_cosine']:g}; logits max |Δ| <= {t['logits_rel_max']:g} x the largest, "
        f"KL <= {t['max_kl']:g}, top-1 >= {100 * t['min_top1']:g}%"
        + (", the whole greedy continuation" if t["full_greedy_match"] else ""),
        "",
        f"  {'layer':>5}  {'max |Δ|':>10}  {'mean |Δ|':>10}  {'rel max':>9}  {'min cos':>10}",
    ]
    threshold = Thresholds(**t)
    for s in report.layers:
        mark = "" if s.passes(threshold) else "  <- past threshold"
        lines.append(f"  {s.layer:>5}  {s.max_abs:>10.3e}  {s.mean_abs:>10.3e}  {s.rel_max:>9.2e}  {s.min_cosine:>10.7f}{mark}")
    lg = report.logits
    matched = sum(m for m, _ in report.greedy_match)
    total = sum(n for _, n in report.greedy_match)
    lines += [
        "",
        f"  logits: max |Δ| {lg.max_abs:.3e} ({lg.rel_max:.2e} of the largest), KL(HF ‖ nanoserve) mean "
        f"{lg.mean_kl:.2e} max {lg.max_kl:.2e}",
        f"  top-1 agreement {100 * lg.top1:.1f}%, top-5 overlap {100 * lg.top5_overlap:.1f}%, "
        f"prompt logprobs max |Δ| {lg.prompt_logprob_max_abs:.3e}",
        f"  greedy continuation: {matched}/{total} tokens match "
        f"({', '.join(f'{m}/{n}' for m, n in report.greedy_match)} per prompt)",
        "",
    ]
    if report.passed:
        lines.append("PASS")
        return "\n".join(lines)
    lines += [f"FAIL: {failure}" for failure in report.failures]
    d = report.diagnosis
    if d is not None:
        tried = ", ".join(f"{name} {rel:.2e}" for name, rel in d["rel_max"].items())
        if d["op"]:
            lines.append(f"first layer past its threshold: {d['layer']}; the op: {d['op']} (re-run from HF's input "
                         f"to layer {d['layer']}, max |Δ| relative with each op on its reference: {tried})")
        else:
            lines.append(f"first layer past its threshold: {d['layer']}; no single op on its reference brings it "
                         f"back (re-run from HF's input, max |Δ| relative: {tried})")
    return "\n".join(lines)
