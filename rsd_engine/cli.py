"""The `rsd` command: generate, score, merge, demo.

    rsd demo                                      # the embedded pair on a few champ problems
    rsd generate --teacher T --student S --data problems.jsonl --out traces.jsonl
    torchrun --nproc-per-node 8 -m rsd_engine.cli generate ...   # one shard per rank, merged at the end
    rsd merge traces.jsonl                        # join the parts of a multi-host run
    rsd --version
    rsd score --student S [--teacher T] --data teacher_traces.jsonl traces.jsonl --plot hist.png
    rsd eval --model M --data problems.jsonl --samples 8 --out gens.jsonl
    rsd provenance --teacher T --student S [--distilled D] --data gens.jsonl --out sentences.jsonl
    rsd provenance-report sentences.jsonl [--rule ratio --margin 0.5] --out report.json --plot report.png
    rsd select --teacher T --student S --data candidates.jsonl --out selected.jsonl [--budget N --by share]

A model (T, S, M) is a local folder or a Hugging Face Hub id such as Qwen/Qwen3-0.6B (models/hub.py).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from pathlib import Path

from rsd_engine.params import MAX_PROPOSAL_TRIALS, SamplingParams
from rsd_engine.pipeline.prompts import DEFAULT_SYSTEM_PROMPT
from rsd_engine.pipeline.progress import context_limit
from rsd_engine.sizes import MAX_SAMPLES, MAX_SIZE

PAPER = SamplingParams()
SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "threshold", "check_temperature",
                   "student_temperature", "student_top_p", "student_top_k", "proposal_trials")


class _Help(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it is required, a switch, or says it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.required or action.nargs == 0 or action.default in (None, "", argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)".lstrip()


def _int(lo, hi=None):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lo or (hi is not None and value > hi):
            allowed = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"must be an integer {allowed}, got {text!r}")
        return value

    return parse


def _report_option(p, command: str, what: str, default: str) -> None:
    p.add_argument("--out", default=None,
                   help=f"{what}; an existing file is replaced only where it is an earlier report of rsd {command}, "
                        f"else refused (default: {default})")


def _plot_option(p, command: str, what: str) -> None:
    p.add_argument("--plot", default=None,
                   help=f"{what} (.png, .pdf or .svg); an existing file is replaced only where it is an earlier "
                        f"plot of rsd {command}, else refused, and so is a folder (default: none)")


def _threads(text):
    from rsd_engine.threads import usable_cpus

    cpus = usable_cpus()
    value = _int(1)(text)
    if value > cpus:  # more threads than CPUs only take turns (10,000 ran 400x slower), never faster
        raise argparse.ArgumentTypeError(f"{value} threads, but this process may use {cpus} CPUs: pass at most {cpus}")
    return value


def _text(text):
    """Text for a model: a byte that is not UTF-8 (the shell's $'\\xff') reaches Python as a lone surrogate, which no
    tokenizer or JSON writer takes."""
    from rsd_engine.pipeline.data import not_unicode

    if reason := not_unicode(text):
        raise argparse.ArgumentTypeError(f"{reason} (a byte that is not UTF-8): pass UTF-8 text")
    return text


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}")
    return value


# Each model option and the option naming its Hub revision.
MODEL_REVISIONS = {"teacher": "teacher_revision", "student": "student_revision", "distilled": "distilled_revision",
                   "model": "revision"}
MODEL_HELP = "a folder (config.json, safetensors, tokenizer) or a Hugging Face Hub id such as Qwen/Qwen3-0.6B"

# Exit statuses of the commands that run a dataset (see _exit_status).
EXIT_USAGE, EXIT_INCOMPLETE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 2, 3, 130, 141


def _exit_codes(unit: str, incomplete: str) -> str:
    return (f"Exit status: 0 every {unit} done; {EXIT_USAGE} bad usage or input (the message says which); "
            f"{EXIT_INCOMPLETE} {incomplete}, said on the last line (the records already written stay; a rerun "
            f"resumes); {EXIT_INTERRUPTED} interrupted (Ctrl-C; the records already written stay); "
            f"{EXIT_BROKEN_PIPE} when what reads the output stops first (a pipe into head).")


def _model_option(p, role: str, help: str, *, required: bool = True):
    """``--role`` (a folder or Hub id) and ``--role-revision`` (``--revision`` for --model)."""
    p.add_argument(f"--{role}", required=required, help=f"{help}: {MODEL_HELP}")
    flag = "--" + MODEL_REVISIONS[role].replace("_", "-")
    p.add_argument(flag, default=None, metavar="REV",
                   help=f"branch, tag or commit of a Hub id --{role} (default: the repo's main; a local folder "
                        f"takes none)")


def _runtime_options(p):
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--sampler", default="auto", choices=["auto", "reference", "cpp", "triton"],
                   help="RSD-sample backend (auto: C++ on CPU, Triton on CUDA)")
    p.add_argument("--threads", type=_threads, default=None,
                   help="CPU threads for torch and OpenMP (default: one per physical core this process may "
                        "use; waiting threads sleep, so a shared machine slows it down rather than stalling it)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (default: a bar when stderr is a terminal)")


def _generate_parser(sub):
    p = sub.add_parser("generate", help="verified RSD traces for a dataset of problems", formatter_class=_Help,
                       description="One RSD trace per problem: up to --attempts tries, the shortest correct one kept; "
                                   "never-solved problems keep a --prefix-tokens prefix (UPFT). Resumable; under "
                                   "torchrun each rank writes its own part. OUT is locked while a run writes it, "
                                   "and OUT.manifest.json records the settings: a rerun under other settings is "
                                   "refused unless --force.",
                       epilog=_exit_codes("problem", "some problems failed, or were cut short or skipped by "
                                                     "--max-seq-len, and have no record"))
    _model_option(p, "teacher", "teacher model")
    _model_option(p, "student", "student model; traces are in its tokens and chat format")
    p.add_argument("--data", required=True, help="problems: .jsonl, .json, .parquet or a datasets save_to_disk folder")
    p.add_argument("--out", required=True, help="output JSONL (rerunning skips the ids already in it)")
    p.add_argument("--force", action="store_true",
                   help="append to an OUT made with other settings (default: refuse, naming the differences)")
    p.add_argument("--question-field", default="question", help="column holding the question text")
    p.add_argument("--answer-field", default="answer",
                   help="column holding the reference answer; '' for none (rows without one: 'unverified')")
    p.add_argument("--id-field", default=None,
                   help="column holding a unique problem id (default: 'id' when the rows have it, else a hash of "
                        "the question text)")
    p.add_argument("--system-prompt", type=_text, default=DEFAULT_SYSTEM_PROMPT,
                   help="system prompt, '' for none (default: '%(default)s')")
    p.add_argument("--attempts", type=_int(1, MAX_SAMPLES), default=16,
                   help=f"tries per problem, at most {MAX_SAMPLES} (default: %(default)s)")
    p.add_argument("--max-fallback", type=_fraction, default=0.5,
                   help="reject traces with a larger share of student-written tokens")
    p.add_argument("--prefix-tokens", type=_int(1), default=128,
                   help="tokens kept for never-solved problems (UPFT)")
    p.add_argument("--format", choices=["jsonl", "sft"], default="jsonl",
                   help="jsonl: full records; sft: prompt-completion records for TRL's SFTTrainer, the text the "
                        "student read and wrote, ended with its tokenizer's EOS (records that are not finished "
                        "answers, the UPFT prefixes of problems never solved, go as full records beside OUT: "
                        "traces.unfinished.jsonl for traces.jsonl)")
    p.add_argument("--select", choices=["shortest", "provenance"], default="shortest",
                   help="which correct attempt to keep: the shortest, or the one with the most teacher-originated "
                        "sentences as rsd select ranks them (default: %(default)s)")
    p.add_argument("--by", choices=["count", "share", "student-likelihood", "random"], default=None,
                   help="--select provenance: rank the correct attempts as rsd select --by does (default: count)")
    p.add_argument("--seed", type=_int(0), default=0, help="seeds derive from it, the problem id and the attempt")
    p.add_argument("--limit", type=_int(1), default=None,
                   help="only the first N problems of the dataset (default: all)")
    p.add_argument("--max-batch-size", type=_int(1, MAX_SIZE), default=32, help="sequences decoded together")
    p.add_argument("--max-seq-len", type=_int(2, MAX_SIZE), default=None,
                   help="KV-cache length per sequence; problems cut short by it are not written (default: "
                        "longest prompt + --max-new-tokens, up to the models' context)")
    p.add_argument("--draft-tokens", type=_int(0), default=0,
                   help="exact speculative RSD: the student drafts this many tokens, the teacher verifies them in "
                        "one pass; same law of traces, fewer teacher passes (0: plain RSD; default: %(default)s)")
    _rule_options(p, default=None)
    s = p.add_argument_group("sampling (defaults: the paper's)")
    s.add_argument("--max-new-tokens", type=_int(1, MAX_SIZE), default=4096,
                   help="tokens generated per attempt at most")
    s.add_argument("--temperature", type=float, default=PAPER.temperature, help="teacher proposal temperature")
    s.add_argument("--top-p", type=float, default=PAPER.top_p, help="teacher proposal nucleus")
    s.add_argument("--top-k", type=_int(0), default=PAPER.top_k, help="teacher proposal top-k, 0: off")
    s.add_argument("--threshold", type=_fraction, default=PAPER.threshold,
                   help="keep a proposal iff the student's probability of it is >= this")
    s.add_argument("--check-temperature", type=float, default=PAPER.check_temperature,
                   help="temperature of the student probability the threshold checks")
    s.add_argument("--student-temperature", type=float, default=PAPER.student_temperature,
                   help="student fallback temperature")
    s.add_argument("--student-top-p", type=float, default=PAPER.student_top_p, help="student fallback nucleus")
    s.add_argument("--student-top-k", type=_int(0), default=PAPER.student_top_k,
                   help="student fallback top-k, 0: off")
    s.add_argument("--proposal-trials", type=_int(1, MAX_PROPOSAL_TRIALS), default=PAPER.proposal_trials,
                   help="teacher proposals tried before the student writes")
    _runtime_options(p)


def _score_parser(sub):
    # The description is printed as it is written: one % sign, not the %% of help strings.
    p = sub.add_parser("score", help="teacher-forced surprisal of traces under the student (and teacher)",
                       formatter_class=_Help,
                       description="Per trace and per file: share of tokens under 1% probability, mean surprisal, "
                                   "perplexity. Several files are compared side by side; ids held by more than one "
                                   "record are reported.",
                       epilog=f"Exit status: 0 every row scored; {EXIT_USAGE} bad usage or input (the message says "
                              f"which); {EXIT_INCOMPLETE} some rows were skipped or failed (named; a torn last line "
                              f"of a file still being written is one); {EXIT_INTERRUPTED} interrupted; "
                              f"{EXIT_BROKEN_PIPE} when what reads the output stops first.")
    _model_option(p, "student", "student model")
    _model_option(p, "teacher", "also score under this teacher model (default: student only)", required=False)
    p.add_argument("--data", required=True, nargs="+", help="trace files (rsd generate output, chat messages, ...)")
    _report_option(p, "score", "JSON report, per file and per trace", "none")
    _plot_option(p, "score", "PNG histogram of student surprisal, one series per file")
    p.add_argument("--completion-field", default=None,
                   help="score this field of any dataset, prompted with --question-field through the chat template "
                        "(default: rsd generate records or chat messages)")
    p.add_argument("--question-field", default="question", help="column holding the question text")
    p.add_argument("--system-prompt", type=_text, default=DEFAULT_SYSTEM_PROMPT,
                   help="system prompt of --completion-field prompts, '' for none (default: '%(default)s')")
    _runtime_options(p)


def _beta(text):
    from rsd_engine.pipeline.categories import check_beta

    try:
        return check_beta(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1), got {text!r}") from None


def _margin(text):
    from rsd_engine.pipeline.categories import check_margin

    try:
        return check_margin(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}") from None


def _rule_options(p, default="difference"):
    from rsd_engine.pipeline.categories import DEFAULT_BETA, DEFAULT_MARGIN, DEFAULT_RULE, RULES

    g = p.add_argument_group("sentence categories (what arXiv 2512.20908's 'pT >> pS' means here)")
    g.add_argument("--rule", choices=RULES, default=default,
                   help="difference: pT - pS > --beta; ratio: log pT - log pS > --margin, which also flags "
                        f"sentences both models find unlikely (default: {DEFAULT_RULE})")
    g.add_argument("--beta", type=_beta, default=None,
                   help=f"margin of --rule difference, in (0, 1) (default: {DEFAULT_BETA})")
    g.add_argument("--margin", type=_margin, default=None,
                   help=f"margin of --rule ratio, in nats of per-token log probability, > 0 (default: "
                        f"{DEFAULT_MARGIN}: the teacher about 1.65 times as likely per token)")


def _response_options(p, what, models_required=True):
    needed = "" if models_required else " (needed by --by count/share; the student also by student-likelihood)"
    _model_option(p, "teacher", "teacher model" + needed, required=models_required)
    _model_option(p, "student", "original student model" + needed, required=models_required)
    p.add_argument("--data", required=True, help=f"{what}: rows with a question and a response (.jsonl, .json, "
                                                 f".parquet, datasets folder), or chat 'messages' records")
    p.add_argument("--out", required=True, help="output JSONL (rerunning resumes it)")
    p.add_argument("--question-field", default="question", help="column holding the question (default: %(default)s)")
    p.add_argument("--response-field", default="response", help="column holding the response (default: %(default)s)")
    # rsd select refuses data in which no row has an id (run_select); provenance hashes the question instead.
    none = ("a hash of the question when rows have none" if what == "responses"
            else "data where no row has one is refused")
    p.add_argument("--id-field", default="id", help=f"column holding the problem id (default: %(default)s; {none})")
    p.add_argument("--system-prompt", type=_text, default=DEFAULT_SYSTEM_PROMPT,
                   help="system prompt each model reads the question with ('' for none; chat records use their own) "
                        "(default: '%(default)s')")
    p.add_argument("--max-seq-len", type=_int(2, MAX_SIZE), default=None,
                   help="longer responses are skipped and counted (default: the longest, up to the models' context)")
    p.add_argument("--batch-size", type=_int(1, MAX_SIZE), default=8,
                   help="responses scored per forward (default: %(default)s)")
    p.add_argument("--include-truncated", action="store_true",
                   help="keep responses cut off by the length limit (finish_reason 'length'; default: skip and count "
                        "them)")
    if what == "responses":
        p.add_argument("--force", action="store_true",
                       help="append to an OUT made with other settings, and trace again responses whose text changed "
                            "since OUT holds them (default: refuse, naming the differences)")
    else:
        _force_option(p)
    _rule_options(p)


def _force_option(p):
    p.add_argument("--force", action="store_true",
                   help="append to an OUT made with other settings (default: refuse, naming the differences)")


def _provenance_parser(sub):
    p = sub.add_parser("provenance", help="where each sentence comes from: teacher, student, shared, boosted",
                       formatter_class=_Help,
                       description="Scores every sentence of every response under each model (geometric mean of its "
                                   "token probabilities, each model in its own chat template and tokens) and labels "
                                   "it teacher / student / shared / boosted (arXiv 2512.20908's categories).",
                       epilog=_exit_codes("response", "some responses were skipped (too long for --max-seq-len, "
                                                      "unreadable by a model's tokenizer, non-finite log-probs, or no "
                                                      "sentence outside the template markers)"))
    _response_options(p, "responses")
    _model_option(p, "distilled", "distilled student (default: none, and no 'boosted')", required=False)
    p.add_argument("--limit", type=_int(1), default=None, help="only the first N responses (default: all)")
    _plot_option(p, "provenance", "PNG: stacked bars of category shares per response")
    _runtime_options(p)


def _select_parser(sub):
    p = sub.add_parser("select", help="keep the candidates richest in teacher-originated sentences (or a baseline)",
                       formatter_class=_Help,
                       description="Teacher-guided selection: candidates share an id. Without --budget each id keeps "
                                   "its best candidate; with --budget N the N best responses (or problems) of the "
                                   "whole dataset are kept, best first. --by random and --by student-likelihood are "
                                   "the baselines at the same budget. Ties go to the shorter.",
                       epilog=_exit_codes("candidate", "some candidates were skipped (too long for --max-seq-len, "
                                                       "unreadable by a model's tokenizer, non-finite log-probs, or no "
                                                       "sentence outside the template markers)"))
    _response_options(p, "candidates", models_required=False)
    p.add_argument("--by", choices=["count", "share", "student-likelihood", "random"], default=None,
                   help="rank by the count or the share of teacher-originated sentences, the student's mean "
                        "log-probability per token, or at random (default: count; share with --budget)")
    p.add_argument("--budget", type=_int(1), default=None,
                   help="keep the N best of the whole dataset (default: none, the best candidate of every id)")
    p.add_argument("--budget-unit", choices=["responses", "problems"], default="responses",
                   help="what --budget counts: responses (several of one id may be kept) or problems (each with "
                        "its best candidate) (default: %(default)s)")
    p.add_argument("--seed", type=_int(0), default=0, help="the draws of --by random (default: %(default)s)")
    p.add_argument("--include-incorrect", action="store_true",
                   help="also rank candidates whose row says \"correct\": false (default: only correct ones, and "
                        "ungraded rows)")
    _runtime_options(p)


def _report_parser(sub):
    from rsd_engine.pipeline.provenance_report import DEFAULT_BINS, DEFAULT_RESAMPLES

    p = sub.add_parser("provenance-report", formatter_class=_Help,
                       help="the papers' analysis of a rsd provenance output, from its stored probabilities",
                       description="Re-categorises every sentence under --rule (no model runs) and reports category "
                                   "shares overall, for correct and incorrect answers and per response; the teacher "
                                   "share by relative position in the response for correct against incorrect "
                                   "answers, the area between those curves and the correlation of a response's "
                                   "teacher share with its correctness, with bootstrap intervals over problems.")
    p.add_argument("sentences", metavar="SENTENCES", help="the --out of rsd provenance (one line per sentence)")
    _report_option(p, "provenance-report", "JSON report", "print only")
    _plot_option(p, "provenance-report", "PNG: teacher share by position, correct vs incorrect, and per response")
    p.add_argument("--bins", type=_int(1, 1000), default=DEFAULT_BINS,
                   help="position bins, at most 1000 (default: %(default)s, deciles)")
    p.add_argument("--resamples", type=_int(1, 100_000), default=DEFAULT_RESAMPLES,
                   help="bootstrap resamples of the problems, at most 100000 (default: %(default)s)")
    p.add_argument("--seed", type=_int(0), default=0, help="seed of the bootstrap (default: %(default)s)")
    p.add_argument("--include-truncated", action="store_true",
                   help="analyse responses cut off by the length limit too (default: leave them out)")
    _rule_options(p)


def _eval_parser(sub):
    p = sub.add_parser("eval", help="accuracy of one model: N samples per problem, answers checked with math-verify",
                       formatter_class=_Help,
                       description="Samples N responses per problem from the model alone and checks each final "
                                   "\\boxed{} answer as rsd generate does. Accuracy: mean over problems of the mean "
                                   "over samples, with a 95% bootstrap interval over problems (exact binomial where "
                                   "none or all are solved). Every generation is "
                                   "written (id, sample, response, correct), resumable; it feeds rsd provenance.",
                       epilog=_exit_codes("generation", "some generations failed (non-finite logits; written "
                                                        "with their error) or were cut short by --max-seq-len, "
                                                        "or problems were skipped as too long"))
    _model_option(p, "model", "the model")
    p.add_argument("--data", required=True, help="problems with reference answers (.jsonl, .json, .parquet, folder)")
    p.add_argument("--out", required=True, help="output JSONL, one line per generation (rerunning resumes it)")
    p.add_argument("--samples", type=_int(1, MAX_SAMPLES), default=1,
                   help=f"samples per problem, at most {MAX_SAMPLES} (default: %(default)s)")
    p.add_argument("--question-field", default="question", help="(default: %(default)s)")
    p.add_argument("--answer-field", default="answer", help="(default: %(default)s; problems without one are skipped)")
    p.add_argument("--id-field", default=None,
                   help="column holding a unique problem id (default: 'id' when the rows have it, else a hash of "
                        "the question text)")
    p.add_argument("--system-prompt", type=_text, default=DEFAULT_SYSTEM_PROMPT,
                   help="'' for none (default: '%(default)s')")
    p.add_argument("--seed", type=_int(0), default=0, help="seeds derive from it, the problem id and the sample")
    _force_option(p)
    p.add_argument("--limit", type=_int(1), default=None, help="only the first N problems of the dataset (default: all)")
    p.add_argument("--max-batch-size", type=_int(1, MAX_SIZE), default=32,
                   help="sequences decoded together (default: %(default)s)")
    p.add_argument("--max-seq-len", type=_int(2, MAX_SIZE), default=None,
                   help="KV-cache length per sequence (default: longest prompt + --max-new-tokens, up to the "
                        "model's context)")
    s = p.add_argument_group("sampling (defaults: the paper's)")
    s.add_argument("--max-new-tokens", type=_int(1, MAX_SIZE), default=4096, help="(default: %(default)s)")
    s.add_argument("--temperature", type=float, default=PAPER.temperature, help="(default: %(default)s)")
    s.add_argument("--top-p", type=float, default=PAPER.top_p, help="(default: %(default)s)")
    s.add_argument("--top-k", type=_int(0), default=PAPER.top_k, help="0: off (default: %(default)s)")
    _runtime_options(p)


def _demo_parser(sub):
    from rsd_engine.pipeline.demo import DEMO_ATTEMPTS, DEMO_MAX_NEW_TOKENS, DEMO_PROBLEMS

    p = sub.add_parser("demo", help="the pipeline on the embedded SmolLM2 pair and a few champ problems",
                       formatter_class=_Help,
                       description="rsd generate and rsd score on the embedded pair: OUT/traces.jsonl is resumable "
                                   "as rsd generate's --out is; a rerun under other settings is refused unless "
                                   "--force.",
                       epilog=_exit_codes("problem", "some problems failed (error), were cut short by "
                                                     "--max-seq-len or had prompts that left no room within it, as "
                                                     "rsd generate"))
    p.add_argument("--out", default="rsd-demo",
                   help="output folder; a problems.jsonl there is written over only where it is one a demo wrote, "
                        "else refused, as is a traces.jsonl rsd generate would refuse, before anything is written")
    p.add_argument("--force", action="store_true",
                   help="append to an OUT/traces.jsonl made with other settings (default: refuse, naming the "
                        "differences)")
    p.add_argument("--problems", type=_int(1, 79), default=DEMO_PROBLEMS, help="champ problems to run")
    p.add_argument("--attempts", type=_int(1, MAX_SAMPLES), default=DEMO_ATTEMPTS,
                   help=f"tries per problem, at most {MAX_SAMPLES} (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=_int(1, MAX_SIZE), default=DEMO_MAX_NEW_TOKENS,
                   help="tokens generated per attempt at most")
    p.add_argument("--seed", type=_int(0), default=0, help="seeds derive from it, the problem id and the attempt")
    _runtime_options(p)


def build_parser() -> argparse.ArgumentParser:
    from rsd_engine import __version__

    parser = argparse.ArgumentParser(prog="rsd", description="Reverse Speculative Decoding: reasoning traces in "
                                                             "the student's own words.")
    parser.add_argument("--version", action="version", version=f"rsd-engine {__version__}")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{generate,score,eval,provenance,provenance-report,select,merge,demo}")
    _generate_parser(sub)
    _score_parser(sub)
    _eval_parser(sub)
    _provenance_parser(sub)
    _report_parser(sub)
    _select_parser(sub)
    merge = sub.add_parser("merge", help="join the per-rank parts of OUT into OUT", formatter_class=_Help,
                           description="Join the parts of OUT (traces.rank*-of-*.jsonl for traces.jsonl: every set of "
                                       "parts, and OUT, if it exists) into "
                                       "OUT in id order, each id once; duplicate ids are reported, copies that "
                                       "differ refused, and so is a line that is no record (no id), naming it, "
                                       "--force or not. Exit status: 0 merged; 2 refused (the message says why); "
                                       "3 merged, but the output lacks records: parts (or OUT) whose run was "
                                       "stopped before its end, or parts missing under --force (said on the last "
                                       "line).")
    merge.add_argument("out", metavar="OUT", help="the --out of the run whose parts to join")
    merge.add_argument("--force", action="store_true",
                       help="merge parts made with other settings, records whose copies differ, and a set of parts "
                            "some ranks' parts are missing from (default: refuse, naming the differences)")
    _demo_parser(sub)
    return parser


def sampling_params(args) -> SamplingParams:
    try:
        return SamplingParams(**{name: getattr(args, name) for name in SAMPLING_FIELDS})
    except ValueError as err:  # name the option, not the dataclass field
        raise ValueError(re.sub(r"SamplingParams\.(\w+)", lambda m: "--" + m[1].replace("_", "-"), str(err))) from None


def _generate(args):
    from rsd_engine.pipeline.generate import GenerateOptions, run_generate

    opts = GenerateOptions(
        teacher=args.teacher, student=args.student, data=args.data, out=args.out, params=sampling_params(args),
        question_field=args.question_field, answer_field=args.answer_field or None, id_field=args.id_field,
        system_prompt=args.system_prompt, attempts=args.attempts, max_fallback=args.max_fallback,
        prefix_tokens=args.prefix_tokens, format=args.format, select=args.select, by=args.by, rule=args.rule,
        beta=args.beta, margin=args.margin, seed=args.seed, limit=args.limit,
        max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len, device=args.device, dtype=args.dtype,
        sampler=args.sampler, draft_tokens=args.draft_tokens, progress=args.progress, force=args.force)
    return _exit_status("generate", _generate_shortfalls(run_generate(opts)))


def _generate_shortfalls(s: dict) -> list[tuple[int, int | None, str, str]]:
    """rsd generate's (and rsd demo's) shortfalls for _exit_status, from run_generate's summary."""
    n, limit = (s["problems"], "problems"), context_limit(s.get("context"), s.get("default_max_seq_len"))
    return [(len(s["failed"]), *n, "failed (error)"), (len(s["cut_short"]), *n, f"were cut short by {limit}"),
            (len(s["prompt_too_long"]), *n, f"were skipped (prompt leaves no room for a new token within {limit})"),
            *_rank0_merge(s)]


def _score(args):
    from rsd_engine.pipeline.score import run_score, shortfalls

    reports = run_score(args.data, student=args.student, teacher=args.teacher, out=args.out, plot=args.plot,
                        completion_field=args.completion_field, question_field=args.question_field,
                        system_prompt=args.system_prompt, device=args.device, dtype=args.dtype,
                        sampler=args.sampler, progress=args.progress)
    return _exit_status("score", shortfalls(reports))


def _eval(args):
    from rsd_engine.pipeline.evaluate import EvalOptions, run_eval

    try:
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k)
    except ValueError as err:
        raise ValueError(re.sub(r"SamplingParams\.(\w+)", lambda m: "--" + m[1].replace("_", "-"), str(err))) from None
    t = run_eval(EvalOptions(params=params, **_fields(args, EvalOptions)))
    # The output's own counts where this rank read it (a rerun that generates nothing still holds them), out of
    # the records it holds (under torchrun or --limit it may hold more than this run's share).
    n = (max(t["problems"] * args.samples, t.get("samples", 0) + t.get("failed_in_output", 0)), "generations")
    limit = context_limit(t.get("context"), t.get("default_max_seq_len"), "the model's")
    return _exit_status("eval", [
        (max(t["failed"], t.get("failed_in_output", 0)), *n, "failed (error)"),
        (max(t["cut_short"], t.get("cut_short_in_output", 0)), *n, f"were cut short by {limit}"),
        (len(t["too_long"]) * args.samples, *n, f"were skipped (prompt leaves no room for a new token within {limit})"),
        *_rank0_merge(t)])


def _provenance(args):
    from rsd_engine.pipeline.provenance import ProvenanceOptions, run_provenance

    t = run_provenance(ProvenanceOptions(**_fields(args, ProvenanceOptions)))
    why = "were skipped (too long for --max-seq-len, unreadable, non-finite log-probs, or no sentence)"
    return _exit_status("provenance", [(len(t["skipped"]), t["responses"], "responses", why),
                                       *_rank0_merge(t)])


def _provenance_report(args):
    from rsd_engine.pipeline.categories import make_rule
    from rsd_engine.pipeline.provenance_report import run_report

    run_report(args.sentences, rule=make_rule(args.rule, beta=args.beta, margin=args.margin), out=args.out,
               plot=args.plot, bins=args.bins, resamples=args.resamples, seed=args.seed,
               include_truncated=args.include_truncated)


def _select(args):
    from rsd_engine.pipeline.select import SelectOptions, run_select

    t = run_select(SelectOptions(**_fields(args, SelectOptions)))
    # A problem whose candidates were all set aside as incorrect is the selection rule at work, not a shortfall
    # (the summary names it); one left with none because they were skipped is counted through the skips.
    return _exit_status("select", [
        (len(t["skipped"]), None, "candidates",
         "were skipped (too long for --max-seq-len, unreadable, non-finite log-probs, or no sentence)"),
        *_rank0_merge(t)])


def _exit_status(command: str, shortfalls: list[tuple[int, int | None, str, str]]) -> int:
    """0, or EXIT_INCOMPLETE with a last line that says, for each (count, total, unit, why) with a count,
    "count of total unit why" ("count unit why" where total is None)."""
    said = [f"{count}{'' if total is None else f' of {total}'} {unit} {why}"
            for count, total, unit, why in shortfalls if count]
    if not said:
        return 0
    print(f"rsd {command}: {'; '.join(said)}: exit status {EXIT_INCOMPLETE}", flush=True)
    return EXIT_INCOMPLETE


def _fields(args, options) -> dict:
    """The options dataclass's fields, taken from the parsed arguments of the same names."""
    from dataclasses import fields

    return {f.name: getattr(args, f.name) for f in fields(options) if hasattr(args, f.name)}


def _merge(args):
    from rsd_engine.pipeline.records import describe_duplicates
    from rsd_engine.pipeline.parts import describe_forced_runs, describe_unfinished, merge_parts

    report = merge_parts(args.out, force=args.force)
    print(f"merged {report.records} records into {args.out}")
    if report.missing:
        print(f"warning: merged under --force without the parts {', '.join(report.missing[:4])}"
              f"{', ...' if len(report.missing) > 4 else ''}: the output lacks whatever they would hold (the ranks "
              f"that write them resume when run again; then merge again)")
    if report.unfinished:
        print(describe_unfinished(report))
    if report.forced:
        print("merged under --force despite other settings: " + "; ".join(report.forced))
    if report.forced_runs:
        print(describe_forced_runs(report))
    if report.conflicts:
        print(f"warning: {len(report.conflicts)} records had copies that differ, merged under --force (the first "
              f"copy kept): " + ", ".join(key.replace(chr(0), "/") for key in list(report.conflicts)[:5]))
    if report.duplicates:
        print(f"warning: {describe_duplicates(report.duplicates)}; kept the first copy of each")
    # A merged output that lacks records is a shortfall, as a run that fell short is: scripts can tell.
    return _exit_status("merge", [*_merged_shortfalls([report]), (len(report.missing), None, "parts", "missing")])


def _merged_shortfalls(reports: list) -> list[tuple[int, int | None, str, str]]:
    """The files of runs stopped before their end that merges joined (their MergeReports), for _exit_status."""
    own = [r.unfinished[0] for r in reports if r.out_unfinished]
    return [(len(own), None, "output", f"({', '.join(own)}) was last written by a run stopped before its end"),
            (sum(len(r.unfinished) for r in reports) - len(own), sum(r.parts for r in reports), "parts",
             "from runs stopped before their end")]


def _rank0_merge(t: dict) -> list[tuple[int, int | None, str, str]]:
    """Rank 0's merge under torchrun (a command's tally): said as `rsd merge` says the same files, or not made."""
    return [*_merged_shortfalls(t.get("merge_reports", [])),
            (1 if t.get("not_merged") else 0, None, "output", "was not merged (said above)")]


def _demo(args):
    from rsd_engine.pipeline.demo import run_demo

    result = run_demo(args.out, problems=args.problems, attempts=args.attempts, max_new_tokens=args.max_new_tokens,
                      seed=args.seed, device=args.device, dtype=args.dtype, sampler=args.sampler,
                      progress=args.progress, force=args.force)
    return _exit_status("demo", _generate_shortfalls(result["generate"]))  # as rsd generate's


COMMANDS = {"generate": _generate, "score": _score, "eval": _eval, "provenance": _provenance,
            "provenance-report": _provenance_report, "select": _select, "merge": _merge,
            "demo": _demo}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():  # the command's way of showing warnings, for its run only
        _one_line_warnings(args.command)
        return _run(parser, args)


def _run(parser, args) -> int:
    if hasattr(args, "threads"):
        from rsd_engine.threads import set_threads

        set_threads(args.threads)
    from rsd_engine.pipeline.records import OutputBusy

    try:
        _resolve_models(args)
        return COMMANDS[args.command](args) or 0
    except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, OutputBusy,
            ImportError) as err:  # ImportError: an optional package a command needs, named with its install
        parser.exit(EXIT_USAGE, f"rsd {args.command}: error: {err}\n")
    except MemoryError as err:  # a KV cache, a work list: sized by the options
        said = str(err) or "no detail"
        parser.exit(EXIT_USAGE, f"rsd {args.command}: error: out of memory: "
                                f"{said.split(': lower ')[0]}{_sizes(args)}\n")  # the options' names, not the API's
    except KeyboardInterrupt:
        out = getattr(args, "out", None) if args.command in RESUMABLE else None
        kept = out and (Path(out, "traces.jsonl" if args.command == "demo" else "").exists()
                        or _wrote_beside(args.command, Path(out)))
        parser.exit(EXIT_INTERRUPTED, f"rsd {args.command}: interrupted" + (
            f"; what it wrote stays in {out} (and the files beside it), and the same command resumes it\n" if kept
            else "; nothing was written\n" if out else "\n"))
    except BrokenPipeError:
        # stdout's reader went away (`rsd ... | head`): what was written stays (records are flushed line by line);
        # no traceback, and none at exit from flushing stdout again. 141: as a shell reports SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as err:  # a path the system refuses (a name too long, a full disk): its own words, no traceback
        parser.exit(EXIT_USAGE, f"rsd {args.command}: error: {err}\n")
    except RuntimeError as err:
        if type(err).__name__ == "OutOfMemoryError":  # torch's, of a CUDA device
            parser.exit(EXIT_USAGE, f"rsd {args.command}: error: {str(err).splitlines()[0]}{_sizes(args)}\n")
        if not str(err).startswith("Symlink loop"):  # pathlib's resolve() of a link to itself
            raise
        parser.exit(EXIT_USAGE, f"rsd {args.command}: error: {err}\n")


def _wrote_beside(command: str, out: Path) -> bool:
    """Whether a file this run writes for `out` other than OUT itself holds something: its part (a rank, under
    RANK/WORLD_SIZE), the unfinished records of `rsd generate --format sft`, the scores of `rsd select --budget`
    (or their parts): what an interrupted run wrote there stays."""
    from rsd_engine.pipeline.distributed import Dist, rank_target
    from rsd_engine.pipeline.generate import unfinished_path
    from rsd_engine.pipeline.select import scores_path

    try:
        dist = Dist.from_env()
    except ValueError:
        return False
    files = {out, unfinished_path(out)} if command == "generate" else {out, scores_path(out)} if command == "select" \
        else {out}
    return any(t.is_file() and t.stat().st_size > 0 for t in {rank_target(f, dist) for f in files} - {out})


def _sizes(args) -> str:
    """"; lower --max-batch-size or --max-seq-len": the options of this command that size its memory."""
    sizes = ("max_batch_size", "batch_size", "max_seq_len", "max_new_tokens")
    options = [f"--{name.replace('_', '-')}" for name in sizes if hasattr(args, name)]
    return f"; lower {', '.join(options[:-1])} or {options[-1]}" if len(options) > 1 else (
        f"; lower {options[0]}" if options else "")


RESUMABLE = ("generate", "eval", "provenance", "select", "demo")  # write records as they go; a rerun resumes


def _one_line_warnings(command: str) -> None:
    """rsd's own warnings as the command's lines on stderr ("rsd eval: warning: ..."), not Python's file:line and
    source line: a researcher reads them as the command's words (a --max-seq-len past a model's context). Others'
    (torch's, transformers') are shown as Python shows them. Set inside main's catch_warnings: undone after."""
    shown = warnings.showwarning
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep

    def show(message, category, filename, lineno, file=None, line=None):
        if os.path.abspath(filename).startswith(package):
            print(f"rsd {command}: warning: {message}", file=file or sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def _resolve_models(args):
    """Model options given as Hub ids become their snapshot folders, each at its --*-revision."""
    from rsd_engine.models.hub import resolve_model

    for role, revision_name in MODEL_REVISIONS.items():
        name, revision = getattr(args, role, None), getattr(args, revision_name, None)
        if name is not None:
            setattr(args, role, str(resolve_model(name, revision)))
        elif revision is not None:
            flag = "--" + revision_name.replace("_", "-")
            raise ValueError(f"{flag} {revision} was given without --{role}")


if __name__ == "__main__":
    sys.exit(main())
