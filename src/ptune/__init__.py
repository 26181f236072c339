"""ptune: parameter-efficient fine-tuning centred on P-Tuning."""

from .version import __version__  # noqa: F401
from .api import (apply, export_peft, from_spec, load_adapter, read_adapter_config, read_spec,  # noqa: E402
                  save_adapter)
from .errors import (AdapterMismatchError, ConfigError, DataError, ModelLoadError, PtuneError,  # noqa: E402
                     TemplateError, UnsupportedModelError)
from .heads import HEAD_KINDS, HeadConfig  # noqa: E402
from .methods import (AdaLoraConfig, BitFitConfig, FullFinetuneConfig, LoraConfig, ManualConfig,  # noqa: E402
                      PrefixTuningConfig, PromptTuningConfig, PTuningConfig, PTuningV2Config, QLoraConfig, make_config,
                      merge_and_unload)
from .model import PtuneModel  # noqa: E402
from .models import load_base, load_tokenizer  # noqa: E402
from .spec import BaseSpec, RunSpec  # noqa: E402
from .templates import Template, TemplateEncoder  # noqa: E402
from . import batching  # noqa: E402  (ptune.batching.collate, as the README uses it)
from .export import export_merged  # noqa: E402  (the generic one: ptune.export.export)
from .adapter_set import AdapterSet, predict_mixed  # noqa: E402

__all__ = ["apply", "export_peft", "export_merged", "from_spec", "load_adapter", "read_adapter_config", "read_spec", "save_adapter",
           "AdapterMismatchError", "ConfigError", "DataError", "ModelLoadError", "PtuneError", "TemplateError",
           "UnsupportedModelError", "HEAD_KINDS", "HeadConfig", "AdaLoraConfig", "BitFitConfig", "FullFinetuneConfig",
           "LoraConfig", "ManualConfig", "PrefixTuningConfig", "PromptTuningConfig", "PTuningConfig", "PTuningV2Config",
           "QLoraConfig", "make_config", "merge_and_unload", "PtuneModel", "load_base", "load_tokenizer", "BaseSpec",
           "RunSpec", "Template", "TemplateEncoder", "batching", "AdapterSet", "predict_mixed", "__version__"]


def __getattr__(name: str):
    """``ptune.engine.Run``, ``ptune.serve.create_app``, ``ptune.cli``: a submodule that ``import ptune``
    does not load eagerly (it would slow every import, or needs an extra) loads on first attribute access."""
    import importlib
    import importlib.util

    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
