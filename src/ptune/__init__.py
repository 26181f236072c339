"""ptune: parameter-efficient fine-tuning centred on P-Tuning."""

__version__ = "0.1.0"

from .api import apply, export_peft, load_adapter, read_adapter_config, save_adapter  # noqa: E402
from .errors import (AdapterMismatchError, ConfigError, DataError, ModelLoadError, PtuneError,  # noqa: E402
                     TemplateError, UnsupportedModelError)
from .heads import HeadConfig  # noqa: E402
from .methods import (AdaLoraConfig, BitFitConfig, FullFinetuneConfig, LoraConfig, ManualConfig,  # noqa: E402
                      PrefixTuningConfig, PromptTuningConfig, PTuningConfig, PTuningV2Config, QLoraConfig, make_config,
                      merge_and_unload)
from .model import PtuneModel  # noqa: E402
from .models import load_base, load_tokenizer  # noqa: E402
from .templates import Template, TemplateEncoder  # noqa: E402
