"""`.mlpackage` -> `.mlmodelc` with Apple's compiler (`xcrun coremlcompiler`, macOS with Xcode only)."""

from __future__ import annotations

import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import ConversionError
from .naming import compiled_path, copy_compiled_resources


def compiler_command(package: Path, dest_dir: Path) -> list[str]:
    """The command that compiles `package` into `dest_dir/<package stem>.mlmodelc`."""
    return ["xcrun", "coremlcompiler", "compile", str(package), str(dest_dir)]


def compiler_available() -> tuple[bool, str]:
    """(available, reason) for Apple's Core ML compiler on this machine."""
    if platform.system() != "Darwin":
        return False, f"Apple's coremlcompiler runs on macOS only (this is {platform.system()})"
    if shutil.which("xcrun") is None:
        return False, "xcrun is not installed (install Xcode or its command line tools)"
    probe = subprocess.run(["xcrun", "--find", "coremlcompiler"], capture_output=True, text=True)
    if probe.returncode != 0:
        return False, "xcrun cannot find coremlcompiler (install Xcode)"
    return True, "xcrun coremlcompiler"


def ensure_compiler() -> None:
    ok, reason = compiler_available()
    if not ok:
        raise ConversionError(
            f"--format compiled needs Apple's Core ML compiler: {reason}.",
            hint="Convert with --format packages here and compile on a Mac, or run `coreml-hub convert` on macOS with Xcode.",
        )


def compile_package(package: Path, dest: Path) -> Path:
    """Compile `package` to exactly `dest` (e.g. `.../compiled/Unet.mlmodelc`), atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".compile-") as tmp:
        proc = subprocess.run(compiler_command(package, Path(tmp)), capture_output=True, text=True)
        produced = Path(tmp) / f"{package.stem}.mlmodelc"
        if proc.returncode != 0 or not produced.is_dir():
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ConversionError(f"coremlcompiler failed on {package.name}: {detail[0]}")
        if dest.exists():
            shutil.rmtree(dest)
        produced.rename(dest)
    return dest


def compile_outputs(results: list[Any], compiled_dir: Path, out: Path, progress: bool) -> list[Any]:
    """Compile every converted package into Apple's compiled layout, with the tokenizer files beside them."""
    from .api import ComponentResult, _size

    compiled = []
    for result in results:
        t0 = time.time()
        dest = compile_package(result.path, compiled_dir / compiled_path(result.name, result.path))
        compiled.append(ComponentResult(result.name, dest, _size(dest), time.time() - t0))
    copy_compiled_resources(out, compiled_dir)
    return compiled
