"""How far one graph walks through mergepass's modules on its way through ``Backend.__call__``.

    python benchmarks/walk.py                       # recipes tome_int8 and tome, a tiny ViT
    python benchmarks/walk.py --recipes tome_int8 --show

A tiny ViT (``vit_tiny_patch16_224``, depth 2, random weights) is compiled once untraced, so that the kernel
decisions are kept on disk and every traced compile takes the same path, then once more under
``sys.setprofile`` with an empty compile cache (``--cache hit``: the cache of the first compile). Only
mergepass's own frames are followed; code of other packages (torch, inductor) is part of the mergepass
frame that called it.

A method runs in the module of its object's class: ``ToMeConfig.replace``, inherited from ``config.Config``, is
ToMe's code (``methods.tome``), as a reader of that class sees it; a comprehension or lambda runs in the module of
the frame it belongs to.

A helper call is a visit to a module that calls no other mergepass module before handing control back to its
caller (``stages.stage``, ``errors.briefly``, ``graph.nodes.traced_value``): the caller never really left. The
pass runner (``rewrite.passes.run``), which only hands its caller's pass the caller's arguments, is read as part of
the caller's frame. The walk is the sequence of modules with helper calls taken out. Its counts:

* steps: hand-overs from one module to another;
* modules: distinct mergepass modules visited;
* returns: steps into a module the walk already left (by a return or by a later call);
* calls: the steps that are calls;
* callbacks: calls into a module that is still waiting lower on the stack (A calls B, B calls A back): the
  returns that are not the end of a call into a helper.

``raw`` counts the same with the helper calls kept in.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# call-throughs: frames read as part of their caller's (module, function)
THROUGH = {("mergepass.rewrite.passes", "run")}


def _module(frame) -> str:
    return frame.f_globals.get("__name__", "")


def _owner(frame, package: str, here: str | None) -> str:
    """The module a frame runs in: its object's class's for a method; for a comprehension or lambda, that of the
    frame it runs for (``here``, where it is defined in the same module); else the one it is defined in."""
    code = frame.f_code
    if code.co_name.startswith("<") and here is not None and frame.f_back is not None \
            and _module(frame.f_back) == _module(frame):
        return here
    if code.co_argcount and code.co_varnames[0] in ("self", "cls"):
        obj = frame.f_locals.get(code.co_varnames[0])
        owner = getattr(obj if isinstance(obj, type) else type(obj), "__module__", "") or ""
        if owner == package or owner.startswith(package + "."):
            return owner
    return _module(frame)


class Walk:
    """The sequence of mergepass modules control passes through while profiling is on."""

    def __init__(self, package: str = "mergepass"):
        self.package = package
        self.stack: list[str] = []      # the module of each mergepass frame on the stack, innermost last
        self.visits: list[list] = []    # [module, how it was entered ("call" | "return"), called another]
        self._ours: dict = {}
        self.callbacks: list[tuple[str, str]] = []  # (caller, callee) where the callee still waits on the stack

    def _is_ours(self, code, frame) -> bool:
        ours = self._ours.get(code)
        if ours is None:
            name = _module(frame)
            ours = self._ours[code] = ((name == self.package or name.startswith(self.package + "."))
                                       and (name, code.co_name) not in THROUGH)
        return ours

    def _moved(self, how: str) -> None:
        here = self.stack[-1] if self.stack else None
        if here is None or (self.visits and self.visits[-1][0] == here):
            return
        if how == "call" and self.visits:
            self.visits[-1][2] = True
        self.visits.append([here, how, False])

    def profile(self, frame, event, arg):
        if event == "call":
            if self._is_ours(frame.f_code, frame):
                name = _owner(frame, self.package, self.stack[-1] if self.stack else None)
                if self.stack and name != self.stack[-1] and name in self.stack:
                    self.callbacks.append((self.stack[-1], name))
                self.stack.append(name)
                self._moved("call")
        elif event == "return":
            if self._is_ours(frame.f_code, frame) and self.stack:
                self.stack.pop()
                self._moved("return")

    def walk(self) -> list[list]:
        """The visits with helper calls taken out (and the visits they split joined again)."""
        out: list[list] = []
        for i, visit in enumerate(self.visits):
            after = self.visits[i + 1] if i + 1 < len(self.visits) else None
            helper = (0 < i and visit[1] == "call" and not visit[2] and after is not None
                      and after[1] == "return" and after[0] == self.visits[i - 1][0])
            if not helper and not (out and out[-1][0] == visit[0]):
                out.append(visit)
        return out

    @staticmethod
    def _counts(visits: list[list]) -> dict:
        seen: set[str] = set()
        returns = 0
        for module, _, _ in visits:
            returns += module in seen
            seen.add(module)
        calls = sum(how == "call" for _, how, _ in visits[1:])
        return {"steps": max(len(visits) - 1, 0), "modules": len(seen), "returns": returns, "calls": calls}

    def counts(self) -> dict:
        return {**self._counts(self.walk()), "callbacks": len(self.callbacks), "raw": self._counts(self.visits)}

    def path(self) -> list[str]:
        return [f"{'<-' if how == 'return' else '->'} {m.removeprefix(self.package + '.')}"
                for m, how, _ in self.walk()]


def traced(backend, walk: Walk):
    """``backend`` with its first call profiled into ``walk``."""
    done = []

    def run(gm, example_inputs):
        if done:
            return backend(gm, example_inputs)
        done.append(1)
        sys.setprofile(walk.profile)
        try:
            return backend(gm, example_inputs)
        finally:
            sys.setprofile(None)
    return run


def walk_recipe(recipe: str, cache: str, img: int = 64) -> Walk:
    import timm
    import torch
    import mergepass
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=img).eval()
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randn(2, 3, img, img, generator=g) for _ in range(2)]
    x = torch.randn(2, 3, img, img, generator=g)
    kwargs = {"calibration": calibration} if "int8" in recipe else {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MERGEPASS_CACHE_DIR"] = str(Path(tmp) / "first")
        with torch.no_grad():  # decisions measured and kept; the cache filled
            torch.compile(model, backend=mergepass.backend(recipe, **kwargs), dynamic=False)(x)
        torch._dynamo.reset()
        if cache == "miss":
            os.environ["MERGEPASS_CACHE_DIR"] = str(Path(tmp) / "second")
        walk = Walk()
        backend = mergepass.backend(recipe, cache=cache != "off", **kwargs)
        with torch.no_grad():
            torch.compile(model, backend=traced(backend, walk), dynamic=False)(x)
        torch._dynamo.reset()
    return walk


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipes", nargs="+", default=["tome_int8", "tome"])
    p.add_argument("--cache", choices=("miss", "hit", "off"), default="miss",
                   help="the traced compile's compile cache: empty (default), filled by the first compile, or off")
    p.add_argument("--show", action="store_true", help="print the walk, step by step")
    p.add_argument("--json", type=Path, help="write the counts (and paths) here")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    out = {}
    for recipe in args.recipes:
        walk = walk_recipe(recipe, args.cache)
        out[recipe] = {**walk.counts(), "path": walk.path(), "visits": walk.visits,
                       "callback_pairs": sorted(set(walk.callbacks))}
        c = out[recipe]
        raw = c["raw"]
        print(f"{recipe}: {c['steps']} steps ({c['calls']} calls), {c['modules']} modules, {c['returns']} returns to "
              f"a module already left, {c['callbacks']} callbacks (with helper calls: {raw['steps']} steps, "
              f"{raw['returns']} returns)")
        for caller, callee in c["callback_pairs"]:
            print(f"  callback: {caller.removeprefix('mergepass.')} -> {callee.removeprefix('mergepass.')}")
        if args.show:
            print("\n".join(f"  {s}" for s in out[recipe]["path"]))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
