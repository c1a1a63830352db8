"""Outside models by name: builder paths (``my_model.py:build``, ``my_package.module:build``) and installed plugins
(entry-point group ``occbench.models``), loaded with the provenance the zoo records.

A builder is a function called as ``build(**options)``, or ``build(checkpoint=PATH, **options)`` when a checkpoint
is given, that returns :func:`occbench.wrap_model`'s model. A plugin package declares its builders as entry points::

    [project.entry-points."occbench.models"]
    my-model = "my_package.models:build"

Zoo names win over plugin names; ``occbench models`` lists both.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from occbench.errors import UserError

GROUP = "occbench.models"


def plugin_entry_points() -> dict[str, EntryPoint]:
    """Installed plugin models: name -> entry point (nothing imported)."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def is_builder_path(text: str) -> bool:
    """``file.py:build`` or ``package.module:build`` (a zoo or plugin name has no colon)."""
    return ":" in text


def import_builder(path: str):
    """The function a builder path names; UserError with the import error's one-line reason."""
    module_part, _, attr = path.rpartition(":")
    if not module_part or not attr:
        raise UserError(f"--model {path!r}: expected path/to/file.py:function or package.module:function")
    if module_part.endswith(".py") or os.sep in module_part or "/" in module_part:
        module = _import_file(path, Path(module_part))
    else:
        try:
            module = importlib.import_module(module_part)
        except Exception as err:  # any import-time failure of user code is the user's to fix
            raise UserError(f"--model {path!r}: module {module_part!r} does not import "
                            f"({type(err).__name__}: {_one_line(err)})") from None
    builder = getattr(module, attr, None)
    if not callable(builder):
        raise UserError(f"--model {path!r}: {module_part!r} has no function {attr!r}")
    return builder


def _import_file(path: str, file: Path):
    if not file.is_file():
        raise UserError(f"--model {path!r}: no file {str(file)!r}")
    name = f"occbench_outside_{file.stem}"
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module          # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise UserError(f"--model {path!r}: {str(file)!r} does not import "
                        f"({type(err).__name__}: {_one_line(err)})") from None
    return module


def load_outside_model(name: str, checkpoint=None, device=None, *, seed: int = 0, **options):
    """A plugin name or builder path -> the model its builder returns, with provenance (builder, plugin package and
    version, checkpoint sha256), on ``device`` (default: cuda if available), in eval mode."""
    import torch

    from occbench.adapters import WrappedModel
    from occbench.assets import sha256_of
    plugins = plugin_entry_points()
    plugin = None
    if is_builder_path(name):
        builder_path = name
        builder = import_builder(name)
    elif name in plugins:
        ep = plugins[name]
        builder_path = ep.value
        plugin = {"name": name, "package": ep.dist.name if ep.dist else None,
                  "version": ep.dist.version if ep.dist else None}
        try:
            builder = ep.load()
        except Exception as err:
            raise UserError(f"--model {name!r}: plugin {plugin['package']} entry point {ep.value!r} does not "
                            f"import ({type(err).__name__}: {_one_line(err)})") from None
    else:
        from occbench.models import model_names
        raise UserError(f"unknown model {name!r}; zoo: {', '.join(model_names())}; plugins: "
                        f"{', '.join(sorted(plugins)) or 'none installed'}; or give path/to/file.py:function")
    kwargs = dict(options)
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise UserError(f"--checkpoint {str(checkpoint)!r}: no such file")
        kwargs["checkpoint"] = str(checkpoint)
    try:
        inspect.signature(builder).bind(**kwargs)
    except TypeError as err:
        raise UserError(f"--model {name!r}: builder {builder_path} does not accept "
                        f"{', '.join(kwargs) or 'no arguments'} ({err})") from None
    except ValueError:   # no signature to inspect (a builtin): let the call decide
        pass
    torch.manual_seed(seed)
    model = builder(**kwargs)
    if not isinstance(model, WrappedModel):
        raise UserError(f"--model {name!r}: builder {builder_path} returned {type(model).__name__}, expected a "
                        "model made with occbench.wrap_model(...)")
    model.provenance.update(
        builder=builder_path, plugin=plugin, seed=seed, options=options or None,
        weights="checkpoint" if checkpoint is not None else "builder",
        checkpoint=str(checkpoint) if checkpoint is not None else None,
        checkpoint_sha256=sha256_of(checkpoint) if checkpoint is not None else None)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.to(device).eval()


def load_any_model(name: str, checkpoint=None, device=None, *, weights: str = "checkpoint", seed: int = 0,
                   **options):
    """A zoo model (:func:`occbench.load_model`) or an outside one (:func:`load_outside_model`) by name."""
    from occbench.models import model_names
    if name in model_names():
        from occbench.zoo import load_model
        return load_model(name, checkpoint=checkpoint, device=device, weights=weights, seed=seed, **options)
    if weights != "checkpoint":
        raise UserError(f"--weights {weights}: only for zoo models; {name!r} is built by its own builder")
    return load_outside_model(name, checkpoint=checkpoint, device=device, seed=seed, **options)


def describe_plugin(name: str, ep: EntryPoint) -> dict:
    """What ``occbench models`` shows for a plugin model: imports its module for the builder's docstring."""
    info = {"name": name, "outside_model": True, "builder": ep.value,
            "package": ep.dist.name if ep.dist else None, "version": ep.dist.version if ep.dist else None}
    try:
        doc = inspect.getdoc(ep.load()) or ""
        info["description"] = doc.strip().splitlines()[0] if doc.strip() else ""
    except Exception as err:   # a broken plugin must not hide the rest of the list
        info["description"] = f"does not import ({type(err).__name__}: {_one_line(err)})"
    return info


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
