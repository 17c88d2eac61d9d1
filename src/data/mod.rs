//! Text side of the library (CPU only, no shader): tokenizers (`tokenizer`, from tokenizer.json
//! bytes or from GGUF tokenizer metadata) and chat templates (`chat`, rendered as transformers
//! renders them).

pub mod chat;
pub mod dataset;
pub mod tokenizer;

pub use chat::{ChatContext, ChatTemplate, Message};
pub use tokenizer::{GgufTokenizer, IncrementalDecoder, SpecialTokenIds, Tokenizer};
