"""lorakit.serve: serve thousands of LoRA adapters on one base model (S-LoRA, arXiv 2311.03285).

Model side: `UnifiedPool` (KV cache and adapters in one paged pool), `LoraWeights` (one adapter in
serving form), `MultiLoraModel` (a different adapter per batch row in one forward), `AdapterStore`
(adapter folders on disk, an LRU cache in host memory).

Engine: `Engine` (continuous batching over a `MultiLoraModel`, KV cache and resident adapters under
one `UnifiedPool` budget), `SamplingParams`, `RequestHandle`, `Completion`.
"""

from lorakit.serve.engine import Completion, Engine, RequestHandle, SamplingParams
from lorakit.serve.lora_batch import LoraWeights, MultiLoraModel
from lorakit.serve.pool import UnifiedPool
from lorakit.serve.store import AdapterStore

__all__ = ["AdapterStore", "Completion", "Engine", "LoraWeights", "MultiLoraModel", "RequestHandle",
           "SamplingParams", "UnifiedPool"]
