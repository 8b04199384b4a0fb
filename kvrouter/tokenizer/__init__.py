"""Engine-exact tokenization for the router: HF tokenizer.json, chat templates rendered as
transformers renders them, and a segment cache that makes turn N of a chat cheap.

Public API: `Tokenizer` (load, encode_prompt, encode_chat, encode_chat_request,
render_chat, content_format, validate_token_ids, vocab_size, cache_stats), the errors
(`UntokenizableContent` for content only the engine can tokenize), and `CacheStats`.
vLLM's chat request preprocessing lives in `kvrouter.tokenizer.preprocess`. Test tokenizers:
`kvrouter.tokenizer.testing.build_test_tokenizer`; benchmark:
`kvrouter.tokenizer.bench.multiturn_speedup`.
"""

from kvrouter.tokenizer.cache import CacheStats
from kvrouter.tokenizer.errors import (
    ChatTemplateError,
    InvalidTokenIdsError,
    TokenizationRequestError,
    TokenizerError,
    TokenizerLoadError,
    UntokenizableContent,
)
from kvrouter.tokenizer.tokenizer import Tokenizer

__all__ = [
    "CacheStats",
    "ChatTemplateError",
    "InvalidTokenIdsError",
    "TokenizationRequestError",
    "Tokenizer",
    "TokenizerError",
    "TokenizerLoadError",
    "UntokenizableContent",
]
