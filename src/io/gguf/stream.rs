//! A GGUF model read as its bytes arrive (a download): the header is parsed from the first
//! bytes, then each tensor the model uses is converted (dequantized, q/k rows restored) as soon
//! as its bytes are complete and its bytes dropped. Held at any time: the header, the bytes of the
//! tensor being received, and the converted tensors (what the host model keeps); never the whole
//! file. The result is the model [`super::load_gguf_with`] makes from the same bytes, bit for
//! bit (the same conversion code).

use std::collections::{BTreeMap, BTreeSet};

use super::file::{GgufHeader, HeaderParse};
use super::llama::{assemble, check_rope_factors, convert_tensor, gguf_name, header_config, permuted_heads, GgufModel, TensorData};
use crate::model::config::ModelConfig;
use crate::{Error, Result};

/// A GGUF file fed in chunks of any size ([`GgufStream::push`]), then [`GgufStream::finish`]ed.
pub struct GgufStream {
    file: String,
    /// Before the header is parsed: the file's first bytes; after: the bytes received so far of
    /// the tensor being received.
    buf: Vec<u8>,
    /// The prefix length at which to try parsing the header again.
    need: usize,
    /// Bytes of the file received.
    received: u64,
    state: Option<Parsed>,
}

struct Parsed {
    header: GgufHeader,
    config: ModelConfig,
    permuted: Option<(usize, usize)>,
    /// Indices (into the header's tensors) of the tensors to convert, by data offset: the data
    /// section is read front to back whatever order the tensor infos list them in.
    queue: Vec<usize>,
    /// How many of `queue` are converted.
    next: usize,
    converted: BTreeMap<String, Vec<f32>>,
}

impl GgufStream {
    /// A stream for the file `file` (its name in errors).
    pub fn new(file: &str) -> Self {
        GgufStream { file: file.to_owned(), buf: Vec::new(), need: 64 << 10, received: 0, state: None }
    }

    /// The header, once its bytes have arrived.
    pub fn header(&self) -> Option<&GgufHeader> {
        self.state.as_ref().map(|p| &p.header)
    }

    /// (tensors converted, tensors to convert); (0, 0) before the header is parsed.
    pub fn tensors_done(&self) -> (usize, usize) {
        self.state.as_ref().map_or((0, 0), |p| (p.next, p.queue.len()))
    }

    /// Bytes held for the header or for the tensor being received (not the converted tensors).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next bytes of the file. Errors as soon as the header or a tensor is invalid.
    pub fn push(&mut self, chunk: &[u8]) -> Result<()> {
        let at = self.received;
        self.received += chunk.len() as u64;
        if self.state.is_some() {
            return self.feed(at, chunk);
        }
        self.buf.extend_from_slice(chunk);
        if self.buf.len() < self.need {
            return Ok(());
        }
        match GgufHeader::parse_prefix(&self.file, &self.buf)? {
            HeaderParse::NeedMore(n) => {
                // At least what the parser asks for, and half again what is here, so that a long
                // header (a tokenizer's vocabulary) is not re-parsed for every small chunk.
                self.need = n.max(self.buf.len() + self.buf.len() / 2);
                Ok(())
            }
            HeaderParse::Done(header) => self.start(header),
        }
    }

    /// The header is complete: the tensors to convert are known; the bytes after the header
    /// already received are fed on.
    fn start(&mut self, header: GgufHeader) -> Result<()> {
        let config = header_config(&header)?;
        let field = if permuted_heads(&config).is_some() { "llama.block_count" } else { "qwen2.block_count" };
        config.check_sizes(header.file(), field, Some(header.tensors().len()))?;
        let mut wanted: BTreeSet<String> = config.tensor_shapes().iter().filter_map(|(n, _)| gguf_name(n)).collect();
        wanted.insert("rope_freqs.weight".into());
        let t = header.tensors();
        let mut queue: Vec<usize> = (0..t.len()).filter(|&i| wanted.contains(&t[i].name)).collect();
        queue.sort_by_key(|&i| t[i].offset);
        let permuted = permuted_heads(&config);
        self.state = Some(Parsed { header, config, permuted, queue, next: 0, converted: BTreeMap::new() });
        let prefix = std::mem::take(&mut self.buf);
        self.feed(0, &prefix)
    }

    /// `chunk` holds the file's bytes from offset `at`: the parts inside the next tensors to
    /// convert are kept until each is complete, then converted; the rest is dropped.
    fn feed(&mut self, mut at: u64, mut chunk: &[u8]) -> Result<()> {
        let p = self.state.as_mut().expect("header parsed");
        while p.next < p.queue.len() {
            let info = &p.header.tensors()[p.queue[p.next]];
            let start = p.header.data_start + info.offset;
            let end = start + info.nbytes as u64;
            if at < start {
                let skip = (start - at).min(chunk.len() as u64);
                chunk = &chunk[skip as usize..];
                at += skip;
            }
            if at < start {
                break;
            }
            let take = (end - at).min(chunk.len() as u64) as usize;
            if self.buf.is_empty() && take == info.nbytes {
                // The whole tensor in this chunk: converted from it, not copied.
                let data = convert_tensor(&self.file, info, &chunk[..take], p.permuted)?;
                p.converted.insert(info.name.clone(), data);
            } else {
                if self.buf.is_empty() {
                    self.buf.reserve_exact(info.nbytes);
                }
                self.buf.extend_from_slice(&chunk[..take]);
                if self.buf.len() < info.nbytes {
                    return Ok(());
                }
                let data = convert_tensor(&self.file, info, &self.buf, p.permuted)?;
                p.converted.insert(info.name.clone(), data);
                self.buf = Vec::new();
            }
            chunk = &chunk[take..];
            at += take as u64;
            p.next += 1;
        }
        Ok(())
    }

    /// The end of the file: the model, as [`super::load_gguf_with`] gives it for the same bytes
    /// (`quantize` as there). A header that never completed gets the whole-file parser's error.
    pub fn finish(mut self, quantize: Option<(usize, bool)>) -> Result<GgufModel> {
        if self.state.is_some() {
            // Empty tensors at the very end.
            self.feed(self.received, &[])?;
        }
        let Some(mut p) = self.state.take() else {
            // Never complete: the whole-file parser names what is wrong (these bytes are all).
            super::file::GgufFile::parse(&self.file, &self.buf)?;
            return Err(Error::format(&self.file, "the GGUF header did not complete"));
        };
        let data_len = self.received.saturating_sub(p.header.data_start);
        for t in p.header.tensors() {
            let end = t.offset.checked_add(t.nbytes as u64);
            if end.is_none_or(|e| e > data_len) {
                return Err(Error::format(
                    &self.file,
                    format!(
                        "tensor `{}`: data at [{}, {}) of the data section runs past the end of the file (the data section has {} bytes): truncated tensor data",
                        t.name,
                        t.offset,
                        end.map_or("overflow".into(), |e| e.to_string()),
                        data_len
                    ),
                ));
            }
        }
        if let Some(f) = p.converted.remove("rope_freqs.weight") {
            p.config.rope_freq_factors = Some(check_rope_factors(&self.file, f)?);
        }
        assemble(&p.header, p.config, TensorData::Converted(p.converted), quantize)
    }
}
