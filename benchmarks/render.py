"""Build ``docs/benchmarks.md`` from the results records in ``benchmarks/results/*.json``.

    python benchmarks/render.py            # rewrite the page
    python benchmarks/render.py --check    # exit 1 if the page differs from what the records give

Every program in ``benchmarks/`` writes one record (``common.write_results``: program,
command, date, machine, its figures, optional ``notes``). A record with ``superseded``
(why, and by what) goes to the dated changelog at the end of the page; the others make
the headline table and the studies. Figures that were measured before the programs wrote
records were transcribed from the page into records of the same form, marked
``transcribed``. Every record must be used by some section (an unused one is an error),
so the page cannot silently drop a result. Only the standard library is needed.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
PAGE = REPO / "docs" / "benchmarks.md"


# -- formatting (also used by the programs to print their tables) ---------------------------
def fmt(value, digits=2) -> str:
    """A number with ``digits`` decimals; "—" for ``None``, "diverged" for a non-finite float."""
    if value is None:
        return "—"
    return "diverged" if isinstance(value, float) and not math.isfinite(value) else f"{value:.{digits}f}"


def table(header: List[str], rows: List[list]) -> str:
    """A Markdown table.

    >>> print(table(["a", "b"], [[1, "x"]]))
    | a | b |
    |---|---|
    | 1 | x |
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def snapshot_at(run: dict, iteration: int) -> Optional[dict]:
    """The run's snapshot taken at ``iteration``, if any."""
    return next((s for s in run["snapshots"] if s["iteration"] == iteration), None)


# -- records ------------------------------------------------------------------------------------
class Records:
    """The results records by file stem; :meth:`take` marks a record used."""

    def __init__(self, folder: Path):
        self.records = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
        self.used: set = set()

    def take(self, name: str) -> dict:
        if name not in self.records:
            raise FileNotFoundError(f"benchmarks/results/{name}.json is missing (the page needs it)")
        self.used.add(name)
        return self.records[name]

    def current(self, prefix: str) -> List[str]:
        """Names of the records starting with ``prefix`` that nothing superseded."""
        return [n for n, r in self.records.items() if n.startswith(prefix) and "superseded" not in r]

    def unused(self) -> List[str]:
        return [n for n in self.records if n not in self.used]


def source(record: dict) -> str:
    """How a record was made: its command, date and machine (and where it was transcribed from)."""
    text = f"`{record['command']}` ({record['date']}; {record['machine']})"
    if "transcribed" in record:
        text += f"; transcribed from {record['transcribed']}"
    return text


def notes(record: dict) -> str:
    """The record's notes as a paragraph of their own."""
    return f"\n\n{record['notes']}" if "notes" in record else ""


def inline_notes(record: dict) -> str:
    """The record's notes, continuing a paragraph."""
    return f" {record['notes']}" if "notes" in record else ""


def nll(run: dict, iteration: int) -> Optional[float]:
    snap = snapshot_at(run, iteration)
    return None if snap is None else -snap["test_ll"]


def budget_snapshot(record: dict, run: dict, fraction: float) -> dict:
    """The first snapshot of a ``per_second.py`` run taken at or after ``fraction`` of its time budget."""
    due = fraction * record["options"]["seconds"]
    return next(s for s in run["snapshots"] if s["seconds"] >= due)


def nll_cell(snap: dict) -> str:
    return f"{-snap['test_ll']:.2f} ({snap['iteration']:,})"


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x"


# -- per second: the headline and its study -----------------------------------------------------
#: The per-second runs made two at a time, side by side, one torch thread each.
PAIRS = [
    ("A", ["per_second_6min_1thread_vae", "per_second_6min_1thread_auto"]),
    ("B", ["per_second_6min_1thread_seed1_vae", "per_second_6min_1thread_seed1_auto"]),
    ("C", ["per_second_6min_1thread_k5_compiled_lr1e-3", "per_second_6min_1thread_k5_compiled_lr3e-3"]),
    ("D", ["per_second_30min_1thread_vae", "per_second_30min_1thread_auto"]),
    # issue 17 item 2: chains every iteration (K = 3) against the VAE, two seeds, both budgets
    ("E", ["per_second_6min_1thread_k3pair_seed0_vae", "per_second_6min_1thread_k3pair_seed0_k3"]),
    ("F", ["per_second_6min_1thread_k3pair_seed1_vae", "per_second_6min_1thread_k3pair_seed1_k3"]),
    ("G", ["per_second_30min_1thread_k3pair_seed0_vae", "per_second_30min_1thread_k3pair_seed0_k3"]),
    ("H", ["per_second_30min_1thread_k3pair_seed1_vae", "per_second_30min_1thread_k3pair_seed1_k3"]),
    # issue 17 item 2: the adaptive schedule's second seed at 30 minutes, on another machine
    ("I", ["per_second_30min_1thread_seed1_vae", "per_second_30min_1thread_seed1_auto"]),
    # issue 17 item 2: persistent chains (K = 3 every iteration) against the VAE, on the same machine as pair I
    ("J", ["per_second_30min_1thread_persistentpair_seed0_vae", "per_second_30min_1thread_persistentpair_seed0_lpc"]),
    ("K", ["per_second_6min_1thread_persistentpair_seed1_vae", "per_second_6min_1thread_persistentpair_seed1_lpc"]),
    ("L", ["per_second_6min_1thread_persistentpair_seed0_vae", "per_second_6min_1thread_persistentpair_seed0_lpc"]),
    ("M", ["per_second_30min_1thread_persistentpair_seed1_vae", "per_second_30min_1thread_persistentpair_seed1_lpc"]),
]
#: Issue 17's target: an LPC setting whose chains run (mean K ≥ 3) this many nats ahead of the VAE
#: at equal wall-clock, in every pair (both budgets, both seeds).
CHAINS_TARGET_NATS, CHAINS_MIN_K = 0.5, 3
EQUAL_ITERATIONS = 16000
FRACTIONS = (1 / 6, 0.5, 1.0)  # per_second.py's snapshot fractions of the budget
METHOD_NAMES = {
    "VAE": "VAE, Pyro `SVI(Trace_ELBO)`",
    "LPC auto, tolerance 3, compiled": "LPC `num_steps=AdaptiveSteps(tolerance=3)`, `jit_compile=True, jit_options={}`",
    "LPC K=5, keep last, η adapted, compiled": "LPC K = 5, `keep=\"last\"`, `target_accept_prob=0.57`, `jit_compile=True, jit_options={}`",
    "LPC K=3, keep last, η adapted, compiled": "LPC K = 3, `keep=\"last\"`, `target_accept_prob=0.57`, `jit_compile=True, jit_options={}`",
    "LPC K=3, keep last, η adapted, compiled, persistent chains": "LPC K = 3, `keep=\"last\"`, `target_accept_prob=0.57`, `jit_compile=True, jit_options={}`, `persistent_chains=True`",
}


def runs_of(records: Records, groups) -> list:
    """``(group, record, run)`` for every run in the records named by ``groups`` (pairs of a label and names)."""
    return [(group, records.take(name), run) for group, names in groups for name in names
            for run in records.records[name]["runs"]]


def present(records: Records, groups) -> list:
    """The groups whose records all exist (a pair still being measured is left out)."""
    return [(group, names) for group, names in groups if all(name in records.records for name in names)]


#: LPC K = 3 trained without a time limit (``per_second.py --max-iterations``) to the iteration counts
#: that the VAE of these pairs reached in its budget: what chains as cheap per iteration as the VAE would score.
UNLIMITED = [("per_iteration_k3_seed0", ("E", "G")), ("per_iteration_k3_seed1", ("F", "H"))]


def persistent_runs(records: Records) -> list:
    """``(pair, record, run)`` for the runs of :data:`PAIRS` with persistent chains."""
    return [(pair, record, run) for pair, record, run in runs_of(records, present(records, PAIRS))
            if run["label"].endswith("persistent chains")]


def pair_list(pairs) -> str:
    return f"pair{'s' if len(pairs) > 1 else ''} {', '.join(pairs)}"


def vae_of(records: Records, pair: str) -> dict:
    return next(run for _, _, run in runs_of(records, [(pair, dict(PAIRS)[pair])]) if run["label"] == "VAE")


def unlimited_records(records: Records) -> list:
    """``(name, record, pairs)`` for the records of :data:`UNLIMITED` that exist (marked used)."""
    return [(name, records.take(name), pairs) for name, pairs in UNLIMITED if name in records.records]


def chains_at_no_cost(records: Records) -> list:
    """``(pair, budget in seconds, the VAE's iterations, lead)`` for each pair of :data:`UNLIMITED`
    whose records exist: the unlimited LPC run's NLL at the last iteration of the pair's VAE against
    the VAE's NLL there (positive: LPC ahead)."""
    found = []
    for name, record, pairs in unlimited_records(records):
        run = record["runs"][0]
        for pair, names in present(records, [(p, dict(PAIRS)[p]) for p in pairs]):
            vae, seconds = vae_of(records, pair), records.records[names[0]]["options"]["seconds"]
            last = vae["iterations"]
            if snapshot_at(run, last) is None:
                raise ValueError(f"{name}.json has no snapshot at {last:,} iterations, the last of pair {pair}'s VAE")
            found.append((pair, seconds, last, nll(vae, last) - nll(run, last)))
    return found


def chains_against_vae(records: Records) -> str:
    """Issue 17's per-second target, judged pair by pair: LPC runs with mean K ≥ 3 against the VAE
    of their own pair at the end of the budget (NLL, lower is better); then the same chains at no cost."""
    lines, met = [], []
    for pair, names in present(records, PAIRS):
        runs = [(record, run) for _, record, run in runs_of(records, [(pair, names)])]
        vae = next((run for _, run in runs if run["label"] == "VAE"), None)
        for record, run in runs:
            if vae is None or (run["mean_num_steps"] or 0) < CHAINS_MIN_K:
                continue
            lead = -vae["snapshots"][-1]["test_ll"] + run["snapshots"][-1]["test_ll"]
            met.append(lead >= CHAINS_TARGET_NATS)
            lines.append(f"pair {pair} ({run['label']}, mean K {run['mean_num_steps']:.2g}, "
                         f"{minutes(record['options']['seconds'])}, seed {record['options']['seed']}): {lead:+.2f} nats")
    if not lines:
        return ""
    verdict = "met" if all(met) else "missed"
    text = (f"Issue 17's target, an LPC setting whose chains run (mean K ≥ {CHAINS_MIN_K}) at least "
            f"{CHAINS_TARGET_NATS} nats ahead of the VAE at equal wall-clock at both budgets, is **{verdict}**; "
            f"the lead over the VAE of its pair (NLL at the end of the budget; positive: LPC ahead): {'; '.join(lines)}.")
    free = chains_at_no_cost(records)
    if free:
        short = sorted({seconds for _, seconds, _, lead in free if lead < CHAINS_TARGET_NATS})
        leads = "; ".join(f"pair {pair} ({minutes(seconds)}, {last:,} iterations) {lead:+.2f}"
                          for pair, seconds, last, lead in free)
        text += (f" Chains at no cost: LPC K = 3 trained without a time limit to the iteration count that its "
                 f"pair's VAE reached (`per_second.py --max-iterations`, same seed and batches), its lead over that VAE "
                 f"there: {leads} nats; so chains as cheap per iteration as the VAE's "
                 + (f"would still miss the target at {' and '.join(minutes(s) for s in short)}: making the chains "
                    "faster cannot meet it on this protocol." if short else "would meet the target."))
    return text


def unlimited_table(records: Records) -> str:
    """The :data:`UNLIMITED` runs against the VAE of the same seed and learning rate, at every iteration
    where a VAE run of :data:`PAIRS` took a snapshot (the VAE's runs of a seed agree per iteration: same
    weights and batches; only their budgets differ)."""
    rows, commands = [], []
    for _, record, _ in unlimited_records(records):
        run = record["runs"][0]
        commands.append(f"`{record['command']}`")
        vaes = [vae for _, other, vae in runs_of(records, present(records, PAIRS)) if vae["label"] == "VAE"
                and other["options"]["seed"] == record["options"]["seed"] and vae["lr"] == run["lr"]]
        for snap in run["snapshots"]:
            vae = next((nll(v, snap["iteration"]) for v in vaes if snapshot_at(v, snap["iteration"])), None)
            if vae is not None:
                rows.append([str(record["options"]["seed"]), f"{snap['iteration']:,}", fmt(vae),
                             fmt(-snap["test_ll"]), f"{vae + snap['test_ll']:+.2f}"])
    if not rows:
        return ""
    return ("Per iteration without a time limit: LPC K = 3 (η adapted, compiled, lr 0.001) trained to the "
            "iteration count that the VAE reached in 30 minutes beside it (pairs G and H), against the VAE of "
            "the same seed at the iterations where one of the headline's VAE runs took a snapshot (test NLL; lead: positive when LPC is ahead). What counts "
            "here is iterations, not time.\n\n"
            + table(["seed", "iterations", "VAE", "LPC K = 3", "lead"], rows)
            + "\n\nCommands: " + "; ".join(commands) + ".\n\n")


def span(values: List[float]) -> str:
    """``"low–high"`` to one decimal, or one value when they agree to it."""
    low, high = f"{min(values):.1f}", f"{max(values):.1f}"
    return low if low == high else f"{low}–{high}"


def minutes(seconds: float) -> str:
    return f"{seconds / 60:g} min"


def wall_clock_table(runs: list) -> str:
    seconds = runs[0][1]["options"]["seconds"]
    rows = []
    for group, record, run in runs:
        mean_k = "—" if run["mean_num_steps"] is None else f"{run['mean_num_steps']:.2g}"
        rows.append([group, f"{run['label']} (lr {run['lr']:g}, seed {record['options']['seed']})",
                     fmt(run["ms_per_iteration"], 1), mean_k]
                    + [nll_cell(budget_snapshot(record, run, f)) for f in FRACTIONS])
    return table(["", "method", "ms / it", "mean K"] + [minutes(f * seconds) for f in FRACTIONS], rows)


def iterations_table(runs: list, iterations) -> str:
    return table([""] + ["method"] + [f"{i:,} it" for i in iterations],
                 [[group, f"{run['label']} (lr {run['lr']:g}, seed {record['options']['seed']})"]
                  + [fmt(nll(run, i)) for i in iterations] for group, record, run in runs])


def profiles_table(runs: list) -> str:
    profiled = [(group, record, run, record["profiles"][run["label"]]) for group, record, run in runs
                if record.get("profiles", {}).get(run["label"])]
    phases = list(dict.fromkeys(name for *_, shares in profiled for name in shares))
    return table(["", "method"] + phases,
                 [[group, f"{run['label']} (lr {run['lr']:g})"]
                  + [f"{100 * shares[p]:.0f}%" if p in shares else "—" for p in phases]
                  for group, record, run, shares in profiled])


def run_notes(runs: list) -> str:
    seen = {}
    for _, record, _ in runs:
        if "notes" in record:
            seen[record["command"]] = record
    return "".join(f"\n\n*{Path(r['command'].split('--out ')[-1]).name}*: {r['notes']}" for r in seen.values())


def headline(records: Records) -> str:
    rows = []
    for pair, record, run in runs_of(records, present(records, PAIRS)):
        o = record["options"]
        rows.append([METHOD_NAMES.get(run["label"], run["label"]),
                     f"pair {pair}: lr {run['lr']:g}, seed {o['seed']}, {minutes(o['seconds'])}",
                     nll_cell(run["snapshots"][-1]), fmt(nll(run, EQUAL_ITERATIONS)), f"`{record['command']}`"])
    target = chains_against_vae(records)
    target = f"\n{target}\n" if target else ""
    vaes = [(pair, record, run) for pair, record, run in runs_of(records, present(records, PAIRS))
            if run["label"] == "VAE"]
    cpu = lambda record: record["machine"].split(";")[0]  # noqa: E731
    others = {}  # pairs run on another machine than the first pair's, by machine
    for pair, record, run in vaes:
        if cpu(record) != cpu(vaes[0][1]):
            others.setdefault((cpu(record), record["date"]), []).append((pair, run["ms_per_iteration"]))
    persistent = [pair for pair, _, _ in persistent_runs(records)]
    persistent = f", and with persistent chains in {pair_list(persistent)}" if persistent else ""
    elsewhere = "".join(
        f" P{pair_list([p for p, _ in group])[1:]} ran on {date} on another 2-core "
        f"machine ({machine}), where the VAE took {span([ms for _, ms in group])} ms per iteration."
        for (machine, date), group in others.items())
    return f"""## Headline: LPC against the VAE on MNIST

Test NLL in nats per image (lower is better): −the IWAE bound with k = 1,000 and the method's own guide,
on the first 1,000 statically binarised MNIST test images. The model: the IWAE paper's 784-200-200-50
tanh MLP decoder and encoder, Bernoulli likelihood, trained on dynamically binarised MNIST with batch
100, Adam (one learning rate for θ and φ), the same initial weights and the same stream of batches for
every method (`benchmarks/common.py`). *Equal wall-clock*: at the end of the budget, iterations reached
in brackets. *Equal iterations*: after {EQUAL_ITERATIONS:,} iterations. The runs were made two at a time,
side by side, each process with one torch thread on its own core of a 2-core CPU (so both members of a
pair saw the same machine); pair C is compared with pair A's VAE.

{table(["method", "setting", "test NLL, equal wall-clock (iterations)",
        f"test NLL at {EQUAL_ITERATIONS:,} iterations", "command"], rows)}

Pairs A–D were measured on 2026-11-26, pairs E–H (issue 17) on 2026-12-02, when the idle machine ran
the VAE at 8.6–9.9 ms per iteration (15.3 in pair E, which shared the machine with other jobs) against
6.7–7.7 then.{elsewhere} Compare within a pair, not across dates or machines. With the
adaptive schedule and a compiled step, LPC is ahead of the VAE at equal wall-clock with two seeds at
6 and at 30 minutes (pairs A, B, D, I), by under a nat; the schedule spends almost no Langevin steps (mean K about 0.25, see
"Per second" below). With Langevin steps every iteration (K = 5 in pair C, K = 3 in pairs E–H{persistent}), LPC is behind at equal wall-clock; at equal iterations it is ahead early in training and behind late (the
table "Per iteration without a time limit" below).
{target}"""


def per_second(records: Records) -> str:
    runs = runs_of(records, present(records, PAIRS))
    six = [r for r in runs if r[1]["options"]["seconds"] == 360]
    thirty = [r for r in runs if r[1]["options"]["seconds"] == 1800]
    h200 = records.take("per_second_h200_40s")
    return f"""### Per second against the VAE (`benchmarks/per_second.py`)

The headline's runs in full: test NLL at fractions of the wall-clock budget (iterations reached), ms per
iteration and the mean number K of Langevin steps per iteration. The commands are in the headline table.

{wall_clock_table(six)}

{wall_clock_table(thirty)}

Per iteration:

{iterations_table(runs, (1000, 4000, 8000, 16000, 64000))}

{unlimited_table(records)}The adaptive schedule (`num_steps="auto"`, whose default tolerance is 3) settles within its
first iterations at K = 0 (θ steps on the guide's draws, as a VAE does) with a 5-step probe chain every
20 iterations: what differs from the VAE there is the Jeffreys warm start's forward-KL term on the
guide's draws, and the chains of the first iterations and probes. A run that takes Langevin steps every
iteration (pair C) is ahead per iteration and behind per second: a compiled chain step costs about one
decoder forward and backward pass, so K steps cost about K/2 VAE iterations, and on MNIST they improve
θ's update by more than that only in the first few thousand iterations. Issue 8's target of the VAE's NLL
at 16,000 iterations in a third of the iterations is missed: K = 5 with adapted η reaches it between
8,000 and 16,000.

Where an LPC iteration spends its time (cProfile over the first 30 iterations, which for compiled
variants include the one-off recording and compilation; cProfile inflates the Python-heavy parts):

{profiles_table(runs)}{run_notes(runs)}

On an H200 ({source(h200)}): {h200['notes']}
"""


# -- cost ----------------------------------------------------------------------------------------
STEP_NAMES = {
    "decoder fwd+bwd (z)": "decoder forward + backward w.r.t. z",
    "plain-torch ∇z energy": "plain-torch ∇z of −log p(x, z)",
    "fit's step": "`fit`'s step, Pyro evaluation",
    "fit's step, recorded": "`fit`'s step, `jit_compile=True` (recorded)",
    "fit's step, compiled": "`fit`'s step, `jit_options={}` (compiled)",
}


def step_cost_rows(record: dict) -> list:
    rows, by_threads = [], {}
    for row in record["rows"]:
        by_threads.setdefault(row["threads"], {})[row["what"]] = row["ms"]
    options = record["compile_options"]
    for threads, times in by_threads.items():
        where = record["device"] + (f", {threads} thread{'s' if threads > 1 else ''}" if threads else "")
        decoder, energy = times.get("decoder fwd+bwd (z)"), times.get("plain-torch ∇z energy")
        for what, ms in times.items():
            name = STEP_NAMES[what] + (f", `{json.dumps(options)}`" if options and what.endswith("compiled") else "")
            rows.append([where, name, f"{ms:.3f}", ratio(ms, decoder) if decoder else "—",
                         ratio(ms, energy) if energy else "—"])
    return rows


def step_cost_table(records: List[dict]) -> str:
    return table(["device", "what", "ms", "/ decoder", "/ plain-torch energy"],
                 [row for record in records for row in step_cost_rows(record)])


def step_cost(records: Records) -> str:
    current = [records.take(n) for n in records.current("step_cost")]
    sources = "".join(f"\n- {source(r)}.{' ' + r['notes'] if 'notes' in r else ''}" for r in current)
    return f"""### Cost of a Langevin step (`benchmarks/step_cost.py`)

One Langevin step of `fit` on the MNIST model (batch 100) against the decoder's forward and backward
pass with respect to z (the floor for any sampler) and against the same energy gradient written in
plain PyTorch; median of `repeats` calls after a warm-up, in one process. Goal (issue 8): a step within
1.3x the decoder.

{step_cost_table(current)}

Runs:{sources}
"""


FIT_VARIANTS = ["pyro_lpc.fit", "fit(jit_compile=True)", "fit(jit_compile={})"]


def fit_overhead_table(records: List[dict]) -> str:
    rows = []
    for r in records:
        where = f"{r['device'].upper()}" + (f", {r['threads']} thread{'s' if r['threads'] > 1 else ''}"
                                            if r["threads"] else "")
        rows.append([where, f"{r['hand_ms']:.2f}"] + [
            f"{r['fit_ms'][v]:.2f} ({ratio(r['fit_ms'][v], r['hand_ms'])})" if v in r["fit_ms"] else "—"
            for v in FIT_VARIANTS] + [f"`{r['command']}`"])
    return table(["device", "hand-written PyTorch", "`fit`", "`fit(jit_compile=True)`", "`fit(jit_options={})`",
                  "command"], rows)


def memory_table(record: dict) -> str:
    return table(["K", "peak RSS (MiB)", "peak CUDA (MiB)"],
                 [[k, fmt(m["rss"], 0), fmt(m["cuda"], 1)] for k, m in record["peak_memory_mib"].items()])


def phases_table(record: dict) -> str:
    return table(["phase", "share"], [[name, f"{100 * share:.0f}%"] for name, share in record["phases"].items()])


def fit_overhead(records: Records) -> str:
    current = [records.take(n) for n in records.current("fit_overhead")]
    extra = "".join(f"\n\n{r['device'].upper()}, {source(r)}: {r['notes']}" for r in current if "notes" in r)
    return f"""### `fit` against a hand-written loop (`benchmarks/fit_overhead.py`)

The same algorithm on the same MNIST-sized model (batch 100, K = 20 Langevin steps with the shared
diagonal preconditioner, θ's gradient accumulated over all kept samples, `keep="all"`, Jeffreys warm start,
Adam on θ and φ) written directly in PyTorch and run through `fit`; random binary images; median ms per
iteration after 5 warm-up iterations, ratio to the hand-written loop in brackets. The hand-written loop
uses the model's own likelihood with argument checks off. Goal (issue 8): `fit` within 1.15x.

{fit_overhead_table(current)}{extra}

Recorded or compiled, `fit` meets the goal on the CPU (compiled it is faster than the hand-written loop,
whose steps are not compiled); through Pyro, and on the H200 (launch-bound at this size), it does not.
Peak memory and the phase profile were last measured with the first timings (Changelog): peak memory
does not grow with K.
"""


# -- the small-budget suite ---------------------------------------------------------------------------
def lpc_settings(record: dict) -> str:
    d = record["lpc_settings"]
    return (f"K = {d['num_steps']} Langevin steps, η = {d['step_size']:g}, `keep={d['keep']!r}`, "
            f"`precondition={d['precondition']!r}` (`fit`'s defaults on {record['date']})")


def common_iteration(runs: List[dict], candidates) -> Optional[int]:
    """The largest snapshot iteration that every run reached."""
    reached = [i for i in candidates if all(snapshot_at(r, i) for r in runs)]
    return max(reached) if reached else None


def mnist(records: Records) -> str:
    rec = records.take("mnist")
    b, runs = rec["budget"], {r["label"]: r for r in rec["runs"]}
    at = common_iteration(rec["runs"], b["snapshot_iterations"])
    matched = rec["matched_iteration"]
    grid_rows = [[r["label"], f"{r['lr']:g}", r["iterations"], fmt(r["val_ll"])]
                 + [fmt(snapshot_at(r, i)["test_ll"]) if snapshot_at(r, i) else "—" for i in (at, matched)]
                 + [fmt(r["snapshots"][-1]["test_ll"]), "**chosen**" if r["chosen"] else ""] for r in rec["grid"]]
    rows = []
    for r in rec["runs"]:
        q, snap, note = r["quality"], snapshot_at(r, at), "" if r["encoder"] else " ¹"
        stop = f" (non-finite at {r['diverged_at']})" if r["diverged_at"] is not None else ""
        rows.append([r["label"] + stop, f"{r['lr']:g}", r["iterations"], fmt(r["seconds"], 1),
                     fmt(r["ms_per_iteration"], 1), fmt(snap["test_ll"]) + note if snap else "—",
                     f"**{fmt(r['snapshots'][-1]['test_ll'])}**{note}", fmt(r["iwae_ll_ais_images"]) + note,
                     fmt(r["ais_ll"]), fmt(q["frechet_distance"]), fmt(q["density"]), fmt(q["coverage"])])
    ref = rec["reference_quality"]
    rows.append(["*real training images*"] + [""] * 8 + [fmt(ref["frechet_distance"]), fmt(ref["density"]),
                                                         fmt(ref["coverage"])])
    final = lambda label: runs[label]["snapshots"][-1]["test_ll"]  # noqa: E731
    lpc, vae, iwae = runs["LPC (Jeffreys)"], runs["VAE"], runs["IWAE (k = 5)"]
    lpc_ranking = sorted((r for r in rec["runs"] if r["family"] == "lpc"), key=lambda r: -r["ais_ll"])
    return f"""### MNIST against the VAE and IWAE, with AIS and sample quality (`benchmarks/mnist.py`)

{source(rec)}.{inline_notes(rec)}

The headline's protocol, every method for **{b['mnist_seconds']:g} s** of training with torch
{rec['threads']} threads, the learning rate of each family chosen on the IWAE bound of the last
{b['val_images']} training images (held out) over {', '.join(f'{x:g}' for x in b['lr_grid'])}. LPC:
{lpc_settings(rec)}, Jeffreys warm start unless the row says otherwise. VAE and IWAE:
`pyro_lpc.baselines.fit_svi` (`Trace_ELBO`; `RenyiELBO(alpha=0)` with 5 particles). *Test LL*: the IWAE
bound (k = {b['eval_samples']:,}, the method's own guide) on the first {b['test_images']:,} test images.
*AIS*: annealed importance sampling from the **prior** (independent of the guide), {b['ais_chains']}
chains × {b['ais_steps']:,} MALA transitions, on the first {b['ais_images']} of those images, next to the
IWAE bound on the same images. *Fréchet distance*, *density*, *coverage*: {b['quality_images']:,} decoded
prior draws against as many grey-level test images in the feature space of a LeNet trained for
{b['feature_epochs']} epochs (test accuracy {100 * rec['feature_accuracy']:.1f} %). One seed, one run: two
runs of this budget differed by up to 20 % in the LPC runs' iterations and up to 8 nats in their final
test LL, enough to reorder the LPC variants (the VAE and IWAE moved by about 1 nat).

Learning-rate grid (runs after LPC (Jeffreys)'s grid also snapshot at its chosen run's final iteration,
{matched}):

{table(["method", "lr", "iterations", "held-out LL", f"test LL at {at} it", f"test LL at {matched} it",
        "test LL, final", ""], grid_rows)}

{table(["method", "lr", "iterations", "seconds", "ms / it", f"test LL at {at} it", "test LL, final",
        f"IWAE LL, {b['ais_images']} img", f"AIS LL, {b['ais_images']} img", "Fréchet dist.", "density",
        "coverage"], rows)}

¹ No guide: the IWAE bound uses the prior as proposal, a looser bound; compare through the AIS column.

- **Equal wall-clock**: LPC (Jeffreys) {final('LPC (Jeffreys)'):.2f}, VAE {final('VAE'):.2f}, IWAE
  {final('IWAE (k = 5)'):.2f} nats (AIS {lpc['ais_ll']:.2f}, {vae['ais_ll']:.2f}, {iwae['ais_ll']:.2f}); LPC
  made {lpc['iterations']:,} updates at {lpc['ms_per_iteration']:.1f} ms to the VAE's {vae['iterations']:,} at
  {vae['ms_per_iteration']:.1f} ms.
- **Equal iterations** ({matched}): LPC (Jeffreys) {fmt(snapshot_at(lpc, matched)['test_ll'])}, VAE
  {fmt(snapshot_at(vae, matched)['test_ll'])}.
- **AIS ranking** of the LPC runs: {' > '.join(f"{r['label']} {r['ais_ll']:.2f}" for r in lpc_ranking)}.

![MNIST test log-likelihood against iterations and seconds](img/mnist_curves.png)

![MNIST samples](img/mnist_samples.png)
"""


CIFAR10_SCORES = ("density", "coverage", "precision", "recall")


def cifar10_scores(quality: dict) -> list:
    """Table cells: Fréchet distance, then :data:`CIFAR10_SCORES`."""
    return [fmt(quality["frechet_distance"])] + [fmt(quality[k]) for k in CIFAR10_SCORES]


def cifar10_table(rec: dict) -> str:
    """The final figures of a ``cifar10.py`` record, one row per method (also the first record's layout)."""
    rows = [[r["label"], f"{r['lr']:g}", r["iterations"], fmt(r["seconds"], 1), fmt(r["ms_per_iteration"], 1),
             f"**{fmt(r['quality']['frechet_distance'])}**"] + cifar10_scores(r["quality"])[1:] for r in rec["runs"]]
    rows.append(["*real training images*", "", "", "", ""] + cifar10_scores(rec["reference_quality"]))
    return table(["method", "lr", "iterations", "seconds", "ms / it", "Fréchet dist.", "density", "coverage",
                  "precision", "recall"], rows)


def cifar10(records: Records) -> str:
    rec = records.take("cifar10")
    b = rec["budget"]
    heading = "### CIFAR-10: sample quality at equal wall-clock (`benchmarks/cifar10.py`)"
    n = f"{rec['num_test']:,}"
    quality = (f"Sample\nquality of {n} samples against the {n} pixel-exact test images, in the feature\n"
               f"space of a LeNet trained for {b['feature_epochs']} epochs (test accuracy "
               f"{100 * rec['feature_accuracy']:.1f} %;\nnot Inception features, so not FIDs).")
    image = "![CIFAR-10 samples: real test images, LPC, VAE](img/cifar10_samples.png)"
    if not rec.get("side_by_side"):  # the first record: the methods one after the other
        return f"""{heading}

{source(rec)}.{inline_notes(rec)}

The convolutional model (`conv_model`, 64 latent dimensions), discretised Gaussian likelihood
(σ = 0.1) on pixels in [-1, 1], batch 100, {b['train_images']:,} training images, **{b['cifar_seconds']:g} s
of training each** with the family's MNIST learning rate; LPC (Jeffreys): {lpc_settings(rec)}. {quality}

{cifar10_table(rec)}

{image}
"""
    variants = "".join(cifar10_variant(records.take(name)) for name in CIFAR10_VARIANTS if name in records.records)
    return f"""{heading}

{source(rec)}.{inline_notes(rec)}

The convolutional model (`conv_model`, 64 latent dimensions), discretised Gaussian likelihood
(σ = 0.1) on pixels in [-1, 1], batch 100, {b['train_images']:,} training images, the same initial weights
and mini-batch stream, **{minutes(b['cifar_seconds'])} of training each, the methods side by side**:
one process per method at the same time, {rec['threads_per_run']} torch thread each, pinned to a core of
its own (column "core"; "—": not pinned); machine load: {rec['load_before']} before the runs,
{rec['load_after']} after.
A run's clock starts at its first mini-batch and everything after it counts as training time
(compilation included — `fit`'s defaults compile nothing —, the first iteration's set-up, chains,
optimiser steps) except the copies of the parameter snapshots. The family's MNIST learning rate;
LPC (Jeffreys): {lpc_settings(rec)}.

{cifar10_runs(rec)}

{quality} Each run is scored at
{", ".join(minutes(f * b["cifar_seconds"]) for f in b["snapshot_fractions"])} of training (the first snapshot
at or after each).

{cifar10_snapshots(rec)}

{image}
{variants}"""


#: Records of ``cifar10.py --lpc SETTING`` shown under the defaults' record.
CIFAR10_VARIANTS = ("cifar10_k5_adapted", "cifar10_k5_adapted_learned_sigma")


def cifar10_runs(rec: dict) -> str:
    return table(["method", "lr", "iterations", "ms / it", "core"],
                 [[r["label"], f"{r['lr']:g}", f"{r['iterations']:,}" + (
                     f" (stopped: non-finite at {r['diverged_at']:,})" if r["diverged_at"] is not None else ""),
                   fmt(r["ms_per_iteration"], 1), "—" if r["core"] is None else r["core"]] for r in rec["runs"]])


def cifar10_snapshots(rec: dict) -> str:
    scores = [[r["label"], f"{s['seconds']:,.0f} s", f"{s['iteration']:,}"] + cifar10_scores(s["quality"])
              for r in rec["runs"] for s in r["snapshots"]]
    scores.append(["*real training images*", "", ""] + cifar10_scores(rec["reference_quality"]))
    return table(["method", "training time", "iterations", "Fréchet dist.", "density", "coverage", "precision",
                  "recall"], scores)


def cifar10_variant(rec: dict) -> str:
    """A ``cifar10.py --lpc`` record: another LPC setting against its own VAE, the same protocol."""
    options = ", ".join(f"`{k}={v!r}`" for k, v in rec["lpc_options"].items())
    scale = rec.get("learned_scale_init")
    likelihood = "" if scale is None else (f"; both methods learn the likelihood's σ (from {scale:g}, "
                                            "instead of σ = 0.1 fixed)")
    return f"""
#### Another LPC setting: {options}{likelihood}

{source(rec)}.{inline_notes(rec)} The protocol above, {minutes(rec['budget']['cifar_seconds'])} each side by side
({rec['load_before']} before, {rec['load_after']} after), with this LPC setting and the rest of `fit`'s defaults.

{cifar10_runs(rec)}

{cifar10_snapshots(rec)}

![CIFAR-10 samples: real test images, LPC ({options}), VAE](img/{rec['samples_image']})
"""


def spread_rows(rows: list, count: int = 4) -> list:
    """About ``count`` of ``rows`` evenly spread, the first and the last included."""
    picks = sorted({round(i * (len(rows) - 1) / (count - 1)) for i in range(count)}) if len(rows) > 1 else [0]
    return [rows[i] for i in picks]


def cifar10_chains(records: Records) -> str:
    """``cifar10_chains.py``: what the chains do on CIFAR-10, setting by setting."""
    rec = records.take("cifar10_chains")
    rows = [[r["label"], f"{row['iteration']:,}", fmt(row.get("energy_drop"), 0), fmt(row.get("late_energy_drop"), 0),
             fmt(row.get("step_size"), 3), fmt(row.get("noise_rms"), 4), fmt(row["guide_sigma"], 3),
             fmt(row.get("late_spread"), 4), fmt(row["second_moment"]), f"{100 * row['saturated']:.1f} %"]
            for r in rec["runs"] for row in spread_rows(r["rows"])]
    finals = "; ".join(f"{r['label']} {r['rows'][0]['second_moment']:.2f} → {r['rows'][-1]['second_moment']:.2f} "
                       f"({100 * r['rows'][-1]['saturated']:.1f} % saturated)" for r in rec["runs"])
    return f"""### CIFAR-10: what the chains do (`benchmarks/cifar10_chains.py`)

{source(rec)}.{inline_notes(rec)}

Why `fit`'s defaults give broken prior samples on CIFAR-10 (the section above). The model, likelihood
and learning rates of `cifar10.py`, {rec['iterations']:,} iterations of batch {rec['batch_size']} from the first
{rec['train_images']:,} training images, the same stream for every setting, {rec['threads']} torch thread{'s' * (rec['threads'] != 1)}. On a
probe batch of the first {rec['probe_images']} training images the chains run afresh from the guide; "drop" is
`U(z_0) − U(z_K)` and "late drop" `U(z_(K/2)) − U(z_K)` (nats per image; at equilibrium the late drop is
near zero and the drop at most of the order of the 64 latent dimensions), "noise" the root mean square over coordinates of `sqrt(2ηP)`, "spread" the
chains' standard deviation over their second half, "mean z²" the aggregate posterior's second moment
(`z_K`; for the VAE the guide's `μ² + σ²`; the prior's is 1, and exact posterior samples of a model
that fits the data have 1 too) and "saturated" the share of pixels with `|x̂| > 0.98` in the decoder means
of 100 prior samples.

{table(["setting", "iteration", "drop", "late drop", "η", "noise", "guide σ", "spread", "mean z²", "saturated"],
       rows)}

Mean z² from the first probe to the last: {finals}.
"""


def step_size(records: Records) -> str:
    rec = records.take("step_size")
    b = rec["budget"]
    groups: dict = {}
    for row in rec["rows"]:
        groups.setdefault((row["precondition"], row["adjust"]), []).append(row)
    label = lambda p, a: f"{'MALA' if a else 'ULA'}, {'diagonal' if p else 'no'} preconditioner"  # noqa: E731
    rows = []
    for i, eta in enumerate(b["step_sizes"]):
        cells = []
        for r in (g[i] for g in groups.values()):
            cell = "diverged" if r["diverged_at"] is not None else fmt(r["test_ll"])
            cells.append(cell + (f" (acc. {r['accept_rate']:.2f})" if r["accept_rate"] is not None else ""))
        rows.append([f"{eta:g}"] + cells)
    spread = "; ".join(f"{label(*k)}: {max(r['test_ll'] for r in v) - min(r['test_ll'] for r in v):.2f} nats"
                       for k, v in groups.items() if all(r["diverged_at"] is None for r in v))
    dataset = ("scikit-learn's embedded 8×8 digits (1,500 training images, dynamically binarised; 16 latent "
               f"dimensions), test IWAE bound (k = {b['eval_samples']:,}) on the {rec['num_test']} statically "
               "binarised test digits" if rec["dataset"] == "digits" else
               f"MNIST, test IWAE bound on {rec['num_test']:,} test images")
    return f"""### Robustness to the Langevin step size (`benchmarks/step_size.py`)

{source(rec)}.{inline_notes(rec)}

LPC (Jeffreys, {lpc_settings(rec)}, Adam 1e-3) on {dataset}; {b['seconds']:g} s of training per cell. Columns:
the shared diagonal preconditioner or none, unadjusted (ULA) or Metropolis-adjusted (MALA; mean acceptance
over the last quarter of the run in brackets). Cells: final test log-likelihood (nats, higher is better).

{table(["η"] + [label(*k) for k in groups], rows)}

Spread over η (best − worst): {spread}. On this small model every variant is robust: the spread is
within about 0.3 nats.

![Final test log-likelihood against the step size](img/step_size.png)
"""


# -- sampling, warm start, distributed, the CLI ---------------------------------------------------
def kernel(records: Records) -> str:
    rec = records.take("kernel")
    rows, ratios = [], []
    for problem, title in rec["titles"].items():
        runs = [r for r in rec["runs"] if r["problem"] == problem]
        setups = list(dict.fromkeys((r["sampler"], r["precondition"], r["chains"]) for r in runs))
        for i, setup in enumerate(setups):
            mine = [r for r in runs if (r["sampler"], r["precondition"], r["chains"]) == setup]
            span = lambda key, digits=0: "–".join(dict.fromkeys(  # noqa: E731  (R-hat of one chain: NaN, shown "—")
                fmt(v, digits) for v in sorted((None if r[key] is None or math.isnan(r[key]) else r[key]
                                                for r in mine), key=lambda v: (v is None, v or 0))))
            name = (f"NUTS (JIT), {setup[2]} chain{'s' if setup[2] > 1 else ''}" if setup[0] == "NUTS"
                    else f"vectorised, `\"{setup[1]}\"`, {setup[2]} chains")
            rows.append([title if i == 0 else "", name, span("seconds", 1), span("min_bulk_ess"),
                         span("min_tail_ess"), span("bulk_ess_per_s", 1), span("tail_ess_per_s", 1),
                         span("bulk_ess_per_1k_grad", 1), span("max_rhat", 2), span("divergences")])
        per_seed = []
        for seed in sorted({r["seed"] for r in runs}):
            best = lambda sampler: max(r["bulk_ess_per_s"] for r in runs  # noqa: E731
                                       if r["sampler"] == sampler and r["seed"] == seed)
            per_seed.append(f"{best('VectorizedMCMC') / best('NUTS'):.3g}x")
        ratios.append(f"{title}: {', '.join(per_seed)}")
    header = ["model", "sampler", "s", "min bulk ESS", "min tail ESS", "bulk ESS / s", "tail ESS / s",
              "bulk ESS / 1k grad", "max R-hat", "divergences"]
    return f"""### Vectorised chains against NUTS (`benchmarks/kernel.py`)

{source(rec)}. `VectorizedMCMC(PCLangevin(model), num_chains=C)` (MALA, one vmapped model evaluation per
step for all chains, {rec['langevin_steps'][0]:,} warm-up steps and {rec['langevin_steps'][1]:,} draws) against
Pyro's NUTS with `jit_compile=True` through `pyro.infer.MCMC` (1 chain, and `num_chains=2`), each model run
as written. ESS: ArviZ's minimum over coordinates of all chains together, over the wall time of the whole
run (warm-up, compilation and worker start-up included); per 1,000 gradient evaluations (NUTS: leapfrog
steps of its 1-chain run; vectorised: C per step). Ranges over seeds {sorted({r['seed'] for r in rec['runs']})};
one torch thread per process; {rec['load_before']} before, {rec['load_after']} after.

{table(header, rows)}

Best vectorised over best NUTS, bulk ESS per second, per seed: {'; '.join(ratios)}.

**Where it wins and where it loses.** Per second the vectorised chains win on every problem, because one
vmapped evaluation advances 64 chains for little more than the cost of one. Per gradient, NUTS's long
trajectories are worth more on the logistic regression with the diagonal `"variance"` (about 10 against
30 ESS per 1,000 gradients); `"dense"`, the covariance pooled from all chains' warm-up draws, closes that
gap (35) and is what a correlated posterior needs: on the 9-link Gaussian chain `"variance"` leaves R-hat
at 1.3. On the 50-d Gaussian, whose covariance is diagonal, `"variance"` is the better choice. The centred
funnel fails for both samplers, and both say so: NUTS with a handful of divergences and R-hat 1.07–1.09,
the chains with thousands of divergences (chains stuck in the neck, every proposal rejected) and R-hat
above 1.8. The ratios for the funnel compare two failures and mean nothing.{notes(rec)}
"""


def kernel_overhead(records: Records) -> str:
    rec = records.take("kernel_overhead")
    base = rec["timing"]["hand-written MALA"]["median_ms"]
    timing = [[f"`{name}`" if name.startswith("PCL") else name + " (same P, η)", f"{t['median_ms']:.3f}",
               ratio(t["median_ms"], base)] for name, t in rec["timing"].items()]
    return f"""### `PCLangevin`'s cost per step against a hand-written MALA loop (`benchmarks/kernel_overhead.py`)

{source(rec)}. One chain on the 100-d logistic regression, post-warm-up steps (median ms over
interleaved rounds):

{table(["loop", "ms / step", "ratio"], timing)}{notes(rec)}
"""


def kernel_one_chain_table(rec: dict) -> str:
    """The first comparison with NUTS (one chain, the then-default diagonal preconditioner)."""
    names = {"logistic": "100-d Bayesian logistic regression, 1,000 points",
             "gaussian": "50-d Gaussian, σ log-spaced in [0.01, 100]"}
    rows = [[names[r["problem"]], "PCLangevin (MALA, diagonal)" if r["sampler"] == "PCLangevin"
             else r["sampler"] + " (no JIT)", f"{r['min_per_s']:g}", f"{r['med_per_s']:g}"] for r in rec["ess"]]
    return (f"One chain each, ESS per second of the whole run:\n\n"
            f"{table(['problem', 'sampler', 'min ESS/s', 'median ESS/s'], rows)}\n\n"
            f"Slope of log P on log σ: {rec['gaussian_p_slope']:.2f} (the diagonal P scales like σ, not σ²).")


def kernel_defaults(records: Records) -> str:
    rec = records.take("kernel_defaults")
    names = {"normal": "normal, unknown mean and scale, 50 points", "gaussian": "10-d Gaussian, sd 0.1..1"}
    rows = []
    for model, title in names.items():
        m = rec[model]
        for i, (site, ref) in enumerate(m["reference_sd"].items()):
            cells = []
            for sampler, s in m["samplers"].items():
                x = s["sites"][site]
                cell = f"{x['sd']:.3f} ± {x['mcse_sd']:.3f}"
                cells.append(cell + (f" ({x['sd'] / ref:.2g}x)" if sampler == "ULA" else ""))
            rows.append([title if i == 0 else "", f"sd of `{site}`"] + cells)
    samplers = list(rec["normal"]["samplers"])
    divergences = rec["normal"]["samplers"]["ULA"].get("divergences")
    return f"""### `PCLangevin`'s defaults against NUTS (`benchmarks/kernel_defaults.py`)

{source(rec)}. One chain, {rec['samples']['MALA']:,} draws for MALA and ULA ({rec['samples']['NUTS']:,} for NUTS);
posterior sd ± its Monte Carlo standard error; in brackets, ULA's sd over the reference (NUTS's for the
normal model, the exact sd for the Gaussian). ULA runs at the step size warm-up tuned for MALA's 57 %
acceptance; the defaults are those of the record's date (since 2026-12-02 the preconditioner is
`"variance"`).

{table(["model", "site"] + [s + (" (default)" if s == "MALA" else "") for s in samplers], rows)}

MALA matches NUTS within Monte Carlo error; ULA's discretisation bias inflates the sds, and it took
{divergences:.0f} of its steps on the normal model past its stability limit. `PCLangevin` therefore defaults
to MALA (`adjust=True`).
"""


def kernel_preconditioners(records: Records) -> str:
    rec = records.take("kernel_preconditioners")
    titles = {"ill": "8-d Gaussian, σ in [1e-2, 1e2]", "chain": "Gaussian chain, 9 links",
              "normal": "normal, unknown mean and scale", "logistic": "logistic regression, 100-d"}
    rows = []
    for problem, title in titles.items():
        runs = [r for r in rec["runs"] if r["problem"] == problem]
        for kind in dict.fromkeys(r["kind"] for r in runs):
            mine = [r for r in runs if r["kind"] == kind]
            span = lambda key, digits=0: "–".join(dict.fromkeys(f"{v:.{digits}f}" for v in sorted(r[key] for r in mine)))  # noqa: E731
            errors = ([span("mean_err_sd", 2), span("sd_err_rel", 2)] if "mean_err_sd" in mine[0] else ["", ""])
            rows.append([title if kind == runs[0]["kind"] else "",
                         f"`{kind}`" + (" (default)" if kind == "variance" else ""),
                         span("min_ess"), span("ess_per_s", 1), span("ess_per_1k_grad", 1)] + errors)
    return f"""### `PCLangevin`'s preconditioners (`benchmarks/kernel_preconditioners.py`)

{source(rec)}. MALA, one chain, {rec['steps']:,} warm-up steps and {2 * rec['steps']:,} draws, seeds 0 and 1
(ranges over the seeds). Min bulk ESS (ArviZ) over coordinates, per second (warm-up included, one
thread) and per 1,000 gradients; largest error of a posterior mean (in posterior sds) and relative
error of a posterior sd against the exact answer (none for the logistic regression).

{table(["model", "precondition", "min ESS", "ESS / s", "ESS / 1k grad", "mean err (sd)", "sd err"], rows)}

`"variance"` whitens (P ≈ σ², not σ) and wins or ties everywhere, so it is the default; `"dense"`
is the one that mixes on the correlated chain, but a 100×100 covariance from one short chain does not
pay on the logistic regression.{notes(rec)}
"""


def kernel_vectorized(records: Records) -> str:
    rec = records.take("kernel_vectorized")
    titles = {"logistic": "logistic regression, 100-d", "ill": "8-d Gaussian, σ in [1e-2, 1e2]"}
    rows = [[titles[r["problem"]], r["sampler"], r["chains"], f"{r['warmup']:,} + {r['draws']:,}", fmt(r["seconds"], 1),
             f"{r['min_ess']:.0f}", fmt(r["ess_per_s"], 1), r["divergences"]] for r in rec["runs"]]
    return f"""### Vectorised chains (`benchmarks/kernel_vectorized.py`)

{source(rec)}. `VectorizedMCMC(PCLangevin(model), num_chains=C)` (MALA, `"variance"`, all chains in one
model evaluation per step) against Pyro's NUTS through `pyro.infer.MCMC` (with `num_chains=2` Pyro drew
the chains one after the other: it keeps one of the 2 cores for the main process). Min bulk ESS (ArviZ)
of all chains together over the wall time of the whole run, warm-up included; one torch thread;
{rec['load_before']} before, {rec['load_after']} after.

{table(["model", "sampler", "chains", "warm-up + draws", "s", "min ESS", "ESS / s", "divergences"], rows)}
{notes(rec)}
"""


def forward_kl_samples(records: Records) -> str:
    rec = records.take("forward_kl_samples")
    rows = [[seed, fmt(s["runs"]["last"]["kl"][-1], 3), fmt(s["runs"]["all"]["kl"][-1], 3),
             f"{s['equal_time']['seconds']:.1f}", fmt(s["equal_time"]["last"], 3), fmt(s["equal_time"]["all"], 3)]
            for seed, s in rec["seeds"].items()]
    iterations = next(iter(rec["seeds"].values()))["runs"]["last"]["iterations"][-1]
    return f"""### Which samples train the forward-KL warm start (`benchmarks/forward_kl_samples.py`)

{source(rec)}. Probabilistic PCA (D = 8, Q = 2, 1,000 points) with θ fixed at the truth, so only the guide
learns; forward KL only, K = {rec['num_steps']}, η = {rec['step_size']:g}, Adam {rec['lr']:g}. KL(p‖q) per data
point (nats) from the exact posterior, after {iterations} iterations and at equal seconds (the `keep="last"`
run's training time):

{table(["seed", 'KL, `keep="last"`', 'KL, `keep="all"`', "equal time (s)", 'KL at it, "last"',
        'KL at it, "all"'], rows)}

Every sample is a little better per iteration and worse per second; `fit` trains the guide on the kept
samples (`keep="last"` by default).
"""


def distributed(records: Records) -> str:
    rec = records.take("distributed")
    each = lambda r: " each" if r["processes"] > 1 else ""  # noqa: E731
    rows = [[f"{r['processes']} ({r['threads']} thread{'s' if r['threads'] > 1 else ''}{each(r)})",
             f"{r['median_s']:.3f}", f"{r['data_points_per_s']:,.0f}",
             "—" if r["allreduce_s"] is None else f"{r['allreduce_s']:.3f} s",
             f"{r['scaling']:.2f}x"] for r in rec["rows"]]
    traffic = [[t["model"], f"{t['theta']:,}", f"{t['phi']:,}", f"{t['bytes'] / 1e6:.2f} MB",
                f"{t['ring_ms_10gbit']:.1f} ms", f"{t['ring_ms_100gbit']:.2f} ms"] for t in rec["traffic"]]
    return f"""### Data-parallel `fit` (`benchmarks/distributed.py`)

{source(rec)}. Gloo on the 2-core CPU, MNIST MLP, K = {rec['num_steps']}, batch {rec['batch']} per process.

{table(["processes", "s / iteration", "data points / s", "in all-reduces", "scaling"], rows)}

Projected traffic (float32; a ring all-reduce over 8 ranks moves 2 (P−1)/P × the bytes per rank):

{table(["model", "θ params", "φ params", "bytes per rank per iteration", "8 ranks, 10 Gbit/s", "100 Gbit/s"], traffic)}
"""


def cli_train(records: Records) -> str:
    rec = records.take("cli_train")
    return f"""### The embedded default (`pyro-lpc train`)

{source(rec)}: LPC on scikit-learn's 8×8 digits with the CLI's defaults, {rec['train_seconds']:g} s of training
({rec['total_seconds']:g} s in all) on the 2-core CPU; test log-likelihood (IWAE, k = 1000)
{rec['test_log_likelihood']:.2f} nats, Fréchet distance {rec['frechet_distance']:.1f}, density {rec['density']:.2f},
coverage {rec['coverage']:.2f} in the LeNet feature space.
"""


def cli_threads(records: Records) -> str:
    rec = records.take("cli_threads")
    rows = []
    for busy in (False, True):
        times = {t: [r["train_seconds"] for r in rec["rows"] if r["threads"] == t and r["busy_neighbour"] == busy]
                 for t in (1, 2)}
        for t in (1, 2):
            rows.append(["+ a busy process" if busy else "no added process", t, ", ".join(f"{x:.1f}" for x in times[t]),
                         ratio(sum(times[t]), sum(times[1]))])
    full = rec["full_run"]
    full_text = "" if full is None else (
        f"The full default run (`pyro-lpc train`, {full['iterations']:,} iterations) with {full['threads']} "
        f"thread(s), no process added (load average {full['loadavg'].split()[-3]}): {full['train_seconds']:.0f} s of training, {full['total_seconds']:.0f} s in all "
        f"(with start-up and evaluation); test log-likelihood {full['test_log_likelihood']:.2f} nats.")
    return f"""### Torch threads for `pyro-lpc train` (`benchmarks/cli_threads.py`)

{source(rec)}. The default run shortened to {rec['epochs']} epochs, each in a fresh process with `--threads` 1
or 2, with no process added and beside an added busy one (a Python loop holding one core); seconds of training
per repeat, and the total time over 1 thread's:

{table(["load", "threads", "training seconds", "time vs 1 thread"], rows)}

Fastest over both conditions: {rec['best_threads']} thread(s), the `--threads` default. {full_text}{notes(rec)}
"""


def imputation(records: Records) -> str:
    rec = records.take("imputation")
    opt, model = rec["options"], rec["model"]
    row = {(r["pattern"], r["method"]): r for r in rec["rows"]}

    def rows(pattern):
        return [[r["method"], f"{r['log_lik_missing']:.2f} ± {r['log_lik_missing_mcse']:.2f}",
                 ", ".join(f"{v:.2f}" for v in r["log_lik_missing_per_seed"]),
                 "—" if r["method"] == "encoder" else f"{r['vs_reference']:+.2f} ± {r['vs_reference_mcse']:.2f}",
                 f"{r['accuracy']:.3f}", f"{r['seconds']:.1f}", f"{r['decoder_passes_per_image']:.0f}",
                 f"{r['accept_rate']:.2f}", f"{r['stuck_images']:.0%}"] for r in rec["rows"] if r["pattern"] == pattern]

    def ll(pattern, method):
        return f"{row[pattern, method]['log_lik_missing']:.1f}"

    header = ["method", "log p(x_mis), nats", "per seed", "gain over the encoder", "accuracy", "s",
              "decoder passes / image", "acceptance", "stuck"]
    tables = "\n\n".join(
        f"**{pattern}** ({model['missing_pixels_per_image'][pattern]} pixels missing per image):\n\n"
        f"{table(header, rows(pattern))}\n\n![observed / imputed / true, {pattern}]"
        f"(img/imputation_{pattern.replace('-', '_')}.png)" for pattern in ("random", "bottom-half"))
    mwg = row["random", "Metropolis-within-Gibbs"]["accept_rate"]
    long_mala = f"chains, MALA, {opt['long_warmup']} warm-up steps"
    return f"""### Filling in missing pixels (`benchmarks/imputation.py`)

{source(rec)}. One model, the 200-200 tanh MLPs with a {opt['latent_dim']}-d latent (Bernoulli), trained with
`fit`'s defaults (LPC, Adam 1e-3, seeded) for {opt['train_epochs']} epochs of {opt['dataset']}
({model['iterations']:,} iterations, {model['seconds'] / 60:.0f} minutes on the loaded machine; test
log-likelihood {model['test_log_likelihood']:.2f} nats, IWAE k = 1000). The
first {opt['num_images']:,} statically binarised test images with {opt['missing_fraction']:.0%} of their pixels
hidden, at random or the bottom half; every method gives S = {opt['num_samples']} draws of z per image, the
iterative ones after {opt['warmup_steps']} discarded steps (adapting η and the preconditioner for ULA and MALA):
(a) the encoder on the image filled in with 0.5, (b) pseudo-Gibbs (Rezende et al. 2014), (c) Metropolis-within-Gibbs
(Mattei & Frellsen 2018; exact), (d) `infer_posterior`'s chains on p(z | x_obs), warm-started by (a); the chains
also with {opt['long_warmup']} warm-up steps.
**log p(x_mis)**: log (1/S) Σ_s p(x_mis | z_s) of the true missing pixels, mean over images and over
{len(opt['seeds'])} seeds (new masks and draws; the same model and images) ± its Monte Carlo standard error over
images; **gain over the encoder**: the same, image by image minus the encoder's (paired, so its error is
smaller); **accuracy**: a classifier (an MLP with 200 ReLU units; {rec['classifier_accuracy_complete']:.3f} on the
complete images) on the images completed with the posterior predictive mean; **s**: wall time of the draws for
all images (one torch thread, {rec['loadavg']} at the end); **decoder passes**: counted by a hook (the chains also
back-propagate through each); **stuck**: the share of images whose z moved in fewer than 10 % of the kept
steps. The pictures (first 8 images, seed {opt['seeds'][0]}) come from the same command.
`pyro-lpc impute RUN_DIR --mask bottom-half|random` does (d) for a trained run ([the command](cli.md)).

{tables}

At about 200 decoder passes per image, the unadjusted chains give the best imputations in both patterns
({ll('random', 'chains, ULA')} and {ll('bottom-half', 'chains, ULA')} nats against pseudo-Gibbs'
{ll('random', 'pseudo-Gibbs')} and {ll('bottom-half', 'pseudo-Gibbs')}) and the best accuracy; the encoder alone,
shown an image half filled with 0.5, is far off ({ll('random', 'encoder')} and {ll('bottom-half', 'encoder')}).
Metropolis-within-Gibbs, exact in the limit, accepts {mwg:.0%} of the encoder's proposals in {opt['latent_dim']}
dimensions, so nearly every image's chain stays where it started: on the bottom half it is no better than the
encoder alone. MALA trails ULA, and {opt['long_warmup']} warm-up steps instead of {opt['warmup_steps']} do not
close the gap ({ll('random', long_mala)} and {ll('bottom-half', long_mala)} nats); about
{row['random', 'chains, MALA']['stuck_images']:.0%} of its images have chains that hardly move, and its error over
images is the largest (a tail of poorly imputed images). `infer_posterior` tunes one step size for all the
images' chains; whether a step size per image would close the gap was not measured.{notes(rec)}
"""


def persistent_chains(records: Records) -> str:
    pairs = [("6 min, all images", ["per_second_6min_1thread_persistent", "per_second_6min_1thread_persistent_off"]),
             ("5,000 images, unadjusted", ["per_second_5k_images_persistent", "per_second_5k_images_persistent_off"]),
             ("5,000 images, MALA", ["per_second_5k_images_mala_persistent",
                                     "per_second_5k_images_mala_persistent_off"])]
    rows = []
    for group, record, run in runs_of(records, pairs):
        last = run["snapshots"][-1]
        stored = run.get("stored_starts_last_tenth")
        rows.append([group, run["label"], fmt(nll(run, 1000)), fmt(nll(run, 2000)),
                     f"{-last['test_ll']:.2f} ({last['iteration']:,} it, {last['seconds']:.0f} s)",
                     fmt(run["ms_per_iteration"], 1), "—" if stored is None else f"{100 * stored:.1f}%"])
    commands = "; ".join(f"`{records.records[n]['command']}`" for _, names in pairs for n in names)
    return f"""### Persistent chains (`benchmarks/per_second.py --persistent-chains`, issue 17 item 1)

`fit(..., persistent_chains=True)` keeps each training image's chain by dataset index and starts each
visit from it or a fresh guide draw by an independence Metropolis choice. MNIST, the headline's model,
LPC with K = 5 every iteration (η adapted, compiled, Adam 1e-3), seed 0, one thread per run on the
shared 2-core machine (load average 3-5, so per-second figures are not comparable across rows). On all
60,000 images a 6-minute run visits each image about 5 times; on the first 5,000 images (50 iterations
an epoch) 2,000 iterations are 40 visits. Test NLL (nats, IWAE with the guide; the 5,000-image runs on
500 test images with k = 200), and the share of chains started from their stored state over the run's
last tenth:

{table(["runs", "method", "NLL at 1,000 it", "NLL at 2,000 it", "NLL at the end", "ms / it",
        "stored starts"], rows)}

Persistent chains did not pay in any of these runs: with unadjusted chains the start is forgotten within
the K steps (the two curves agree per iteration), and with MALA the stored states almost always win the
Metropolis choice (99.9 %) yet lag behind θ, and training ends worse. Commands: {commands}.
{persistent_against_fresh(records)}"""


def persistent_against_fresh(records: Records) -> str:
    """The persistent-chain runs of the headline's pairs against LPC with the same setting and fresh
    starts (the :data:`UNLIMITED` run of the same seed), per iteration."""
    unlimited = {record["options"]["seed"]: record["runs"][0] for _, record, _ in unlimited_records(records)}
    rows, gaps = [], []
    for pair, record, run in persistent_runs(records):
        fresh = unlimited.get(record["options"]["seed"])
        if fresh is None:
            continue
        shared = [s["iteration"] for s in run["snapshots"] if snapshot_at(fresh, s["iteration"])]
        gaps += [nll(run, i) - nll(fresh, i) for i in shared]
        rows.append([pair, str(record["options"]["seed"]), minutes(record["options"]["seconds"]),
                     f"{100 * run['stored_starts_last_tenth']:.1f}%",
                     "; ".join(f"{i:,}: {nll(run, i):.2f} against {nll(fresh, i):.2f}" for i in shared)])
    if not gaps:
        return ""
    verdict = "trail" if min(gaps) > 0 else "lead" if max(gaps) < 0 else "are sometimes ahead of, sometimes behind"
    return f"""
Against the VAE at equal wall-clock, persistent chains with K = 3 every iteration (η adapted, compiled,
lr 0.001) are {pair_list([row[0] for row in rows])} of the headline. Per iteration they {verdict} the same setting with fresh starts
from the guide (the runs without a time limit of "Per second", same seed and batches; test NLL, persistent
first):

{table(["pair", "seed", "budget", "stored starts, last tenth", "NLL at equal iterations: persistent against fresh starts"], rows)}
"""


def paired_difference(values: List[float], base: List[float]) -> tuple:
    """Mean of ``values[i] − base[i]`` and its standard error over the pairs."""
    diffs = [a - b for a, b in zip(values, base)]
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / max(len(diffs) - 1, 1))
    return mean, sd / math.sqrt(len(diffs))


def converged(records: Records) -> str:
    """Issue 17 item 3: each method trained until its held-out bound stopped improving, scored by AIS
    (``converged*.json``, possibly several processes); nothing until such a record exists."""
    recs = [records.take(name) for name in records.current("converged")]
    if not recs:
        return ""
    key = lambda rec: tuple(rec["options"][k] for k in ("train_images", "seed", "test_images", "ais_chains",  # noqa: E731
                                                          "ais_steps"))
    ais = lambda rec, run, factor=4: run["ais"][str(factor * rec["options"]["ais_steps"])]  # noqa: E731
    vaes = {key(rec): ais(rec, run)["per_image"] for rec in recs for run in rec["runs"] if run["label"] == "VAE"}
    rows, verdicts, rises = [], [], []
    order = lambda pair: (pair[1]["label"] != "VAE", pair[1]["label"].startswith("LPC"), pair[1]["label"],  # noqa: E731
                          pair[0]["options"]["seed"])
    for rec, run in sorted(((rec, run) for rec in recs for run in rec["runs"]), key=order):
        o = rec["options"]
        short, long = ais(rec, run, 1)["log_likelihood"], ais(rec, run)["log_likelihood"]
        rises.append(long - short)
        vae = vaes.get(key(rec)) if run["label"] != "VAE" else None
        gain = None if vae is None else paired_difference(ais(rec, run)["per_image"], vae)
        stop = ("converged" if run["converged"] else "**capped**") if run["diverged_at"] is None else \
            f"non-finite at {run['diverged_at']:,}"
        rows.append([run["label"], o["seed"], f"{o['train_images']:,}", f"{run['best_iteration']:,}",
                     fmt(run["best_seconds"] / 60, 1), stop, fmt(run["held_out"]), fmt(run["train_bound"]),
                     fmt(short), fmt(long), fmt(run["test_iwae"]), fmt(run["test_iwae"] - long),
                     "—" if gain is None else f"{gain[0]:+.2f} ± {gain[1]:.2f}"])
        if run["label"].startswith("LPC") and gain is not None:
            close = abs(gain[0] - 1) < 2 * gain[1]
            verdicts.append(f"{run['label']} (seed {o['seed']}): {gain[0]:+.2f} ± {gain[1]:.2f} nats, "
                            f"{'meets' if gain[0] >= 1 else 'misses'} the target"
                            + (" (+1 lies within two standard errors)" if close else "")
                            + ("" if run["converged"] else " (capped: not at convergence)"))
    o = recs[0]["options"]
    lengths = sorted({rec["options"]["ais_steps"] for rec in recs})
    target = ("; ".join(verdicts) + "." if verdicts else
              "no LPC run has a VAE run with the same settings to compare with.")
    commands = "; ".join(source(rec) for rec in recs)
    return f"""### Converged quality, compared by AIS (`benchmarks/converged.py`, issue 17 item 3)

Each method trains on the first training images (column *images*; the headline's model, batch 100 of
dynamically binarised images, Adam {o['lr']:g}, one torch thread) until its held-out bound stops improving:
the IWAE bound (k = {o['held_out_samples']}, own guide) on the last 500 training images every {o['every']:,}
iterations; training stops when it has not risen by more than {o['min_delta']:g} nats for {o['patience']}
evaluations in a row, or at a cap of {' or '.join(minutes(c) for c in sorted({r['options']['max_seconds'] for r in recs}))} of training (*capped*: not converged). The
state with the best held-out bound is kept; *it. / min to best*: its iteration and training minutes
(evaluation excluded). *train*: the same bound on the first 500 training images (statically binarised);
train − held-out shows overfitting. On the first {o['test_images']:,} statically binarised test images:
**AIS** from the prior (guide-independent), {o['ais_chains']} chains × T MALA transitions, with T =
{' or '.join(f'{t:,}' for t in lengths)} and with 4T (a tight estimate changes little from T to 4T); *test
IWAE*: k = {o['test_samples']:,}, own guide; *IWAE − AIS*: the guide's gap (AIS with 4T); *− VAE (AIS)*: AIS
(4T) minus the VAE's with the same settings, ± its standard error over the images (paired). Log-likelihoods in
nats per image (higher is better).

{table(["method", "seed", "images", "it. to best", "min to best", "stopped", "held-out", "train", "AIS, T", "AIS, 4T",
        "test IWAE", "IWAE − AIS", "− VAE (AIS)"], rows)}

From T to 4T the AIS estimates rose by {min(rises):.2f} to {max(rises):.2f} nats. Target (LPC ≥ the VAE + 1 nat
by AIS with 4T): {target}

Commands: {commands}.{''.join(notes(rec) for rec in recs)}
"""


# -- the changelog ---------------------------------------------------------------------------------
def superseded(records: Records) -> str:
    """Every superseded record, by date (newest first), with what superseded it."""
    by_date: dict = {}
    for name, rec in records.records.items():
        if "superseded" in rec:
            by_date.setdefault(rec["date"], []).append(name)
    out = []
    for date in sorted(by_date, reverse=True):
        out.append(f"### {date}\n")
        per_second_first = [n for n in by_date[date] if n.startswith("per_second")]
        if per_second_first:
            runs = runs_of(records, [(f"`{n}`", [n]) for n in per_second_first])
            first = records.records[per_second_first[0]]
            out.append(f"""#### Per second against the VAE, first pass (2 torch threads per run)

Superseded {first['superseded']}. Commands: {'; '.join(f"`{records.records[n]['command']}`" for n in per_second_first)}.

{wall_clock_table(runs)}

{iterations_table(runs, (1000, 4000, 16000, 32000))}

{profiles_table(runs)}{run_notes(runs)}
""")
        for name in by_date[date]:
            rec = records.take(name)
            if name.startswith("per_second"):
                continue
            if name.startswith("step_cost"):
                body = step_cost_table([rec])
            elif name.startswith("fit_overhead"):
                body = fit_overhead_table([rec])
                if rec["peak_memory_mib"]:
                    body += "\n\nPeak memory of a 5-iteration `fit` in a fresh process:\n\n" + memory_table(rec)
                if rec["phases"]:
                    body += "\n\nWhere `fit`'s time went (cProfile):\n\n" + phases_table(rec)
            elif name.startswith("cli_train"):
                body = (f"{rec['train_seconds']:g} s of training; test log-likelihood "
                        f"{rec['test_log_likelihood']:.1f}, "
                        f"Fréchet distance {rec['frechet_distance']:.1f}, density {rec['density']:.2f}, coverage "
                        f"{rec['coverage']:.2f}.")
            elif name.startswith("cifar10"):
                b = rec["budget"]
                body = (f"{b['cifar_seconds']:g} s of training each, one method after the other with "
                        f"{rec['threads']} torch threads; LPC (Jeffreys): {lpc_settings(rec)}.\n\n{cifar10_table(rec)}")
            elif name == "kernel_one_chain":
                body = kernel_one_chain_table(rec)
            elif name == "notebook02":
                body = table(["method", "iterations", "ms / iteration", "test NLL"],
                             [[r["method"], f"{r['iterations']:,}", f"{r['ms_per_iteration']:g}",
                               f"{r['test_nll']:.1f}"] for r in rec["rows"]])
            else:
                raise ValueError(f"benchmarks/results/{name}.json: no changelog layout for program {rec['program']!r}")
            out.append(f"#### `{name}.json`\n\n{source(rec)}. Superseded {rec['superseded']}.\n\n{body}{notes(rec)}\n")
    return "\n".join(out)


# -- the page --------------------------------------------------------------------------------------
STUDIES = [per_second, persistent_chains, step_cost, fit_overhead, mnist, converged, cifar10, cifar10_chains, step_size, kernel, kernel_overhead, kernel_defaults,
           kernel_preconditioners, kernel_vectorized, forward_kl_samples, distributed, cli_train, cli_threads, imputation]


def render(folder: Path = RESULTS) -> str:
    """The page, from the records in ``folder``; raises if a record is used by no section."""
    records = Records(folder)
    body = "\n".join(section for section in (study(records) for study in STUDIES) if section)
    page = f"""# Benchmarks

<!-- Generated by benchmarks/render.py from benchmarks/results/*.json; do not edit by hand. -->

Every figure on this page comes from a results record in `benchmarks/results/`, written by the program
that measured it (each `benchmarks/*.py` prints its figures and writes one; the command, date and
machine are given with each result). The page is rebuilt with `python benchmarks/render.py`; a test
checks that it matches the records. CPU figures: 2-core machines (an AMD EPYC; some records of
2026-12-02 an Intel Xeon, as each record's machine says) with torch 2.14.1 and pyro 1.9.2; GPU figures:
one NVIDIA H200. Figures that later measurements replaced are in the
[Changelog](#changelog) at the end, with their dates.

{headline(records)}
## Studies

{body}
## Changelog

{superseded(records)}"""
    unused = records.unused()
    if unused:
        raise ValueError(f"results not shown on the page: {', '.join(f'benchmarks/results/{n}.json' for n in unused)}"
                         " (add them to a section of benchmarks/render.py)")
    return page


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with docs/benchmarks.md instead of writing it")
    args = parser.parse_args()
    page = render()
    if args.check:
        if PAGE.read_text() != page:
            sys.exit(f"{PAGE.relative_to(REPO)} differs from what benchmarks/results/*.json give: "
                     "run python benchmarks/render.py")
        print(f"{PAGE.relative_to(REPO)} matches the results")
        return
    PAGE.write_text(page)
    print(f"wrote {PAGE.relative_to(REPO)}")


if __name__ == "__main__":
    main()
