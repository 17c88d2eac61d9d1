//! A GGUF model read as its bytes arrive (a download): the header is parsed from the first
//! bytes, then each tensor the model uses is converted (dequantized, q/k rows restored) as soon
//! as its bytes are complete and its bytes dropped. Held at any time: the header, the bytes of the
//! tensor being received, and the converted tensors (what the host model keeps); never the whole
//! file. The result is the model [`super::load_gguf_with`] makes from the same bytes, bit for
//! bit (the same conversion code). Fed with [`GgufStream::push_to`] instead, each converted
//! tensor is handed to a sink (an upload to the GPU) and not kept: then the stream holds only
//! the header and the tensor being received.

use std::collections::{BTreeMap, BTreeSet};

use super::file::{GgufHeader, HeaderParse};
use super::file::GgufValue;
use super::llama::{assemble, check_rope_factors, check_tensor, convert_tensor, gguf_name, header_config, permuted_heads, GgufModel, TensorData};
use super::GgmlType;
use crate::io::HostTensor;
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
    /// The converted tensors, by llama.cpp name ([`GgufStream::push`]).
    converted: BTreeMap<String, Vec<f32>>,
    /// Fed by [`GgufStream::push_to`]: tensors go to a sink, checked against the config first.
    to_sink: bool,
}

/// Where a converted tensor goes: kept by llama.cpp name, or handed to a sink as
/// (config, Hugging Face name, tensor).
enum Out<'s, 'm> {
    Keep(&'m mut BTreeMap<String, Vec<f32>>),
    Sink(&'s mut dyn FnMut(&ModelConfig, &str, HostTensor) -> Result<()>),
}

/// What a stream fed through [`GgufStream::push_to`] gives at its end: everything of a
/// [`GgufModel`] but the weights (which went to the sink).
#[derive(Clone, Debug)]
pub struct StreamedGguf {
    /// The config, with `rope_freqs.weight`'s factors when the file has them.
    pub config: ModelConfig,
    /// GGUF version of the file.
    pub version: u32,
    /// Every metadata key-value pair.
    pub metadata: BTreeMap<String, GgufValue>,
    /// The tensor types of the file, by llama.cpp name.
    pub tensor_types: BTreeMap<String, GgmlType>,
    /// The file's tensors the model does not use, sorted (as [`crate::io::HostModel::unused`]).
    pub unused: Vec<String>,
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
    /// (Hugging Face name, shape) of each tensor to convert but rope_freqs, by llama.cpp name.
    names: BTreeMap<String, (String, Vec<usize>)>,
    /// rope_freqs.weight, converted.
    rope: Option<Vec<f32>>,
}

impl GgufStream {
    /// A stream for the file `file` (its name in errors).
    pub fn new(file: &str) -> Self {
        GgufStream {
            file: file.to_owned(),
            buf: Vec::new(),
            need: 64 << 10,
            received: 0,
            state: None,
            converted: BTreeMap::new(),
            to_sink: false,
        }
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
        let mut kept = std::mem::take(&mut self.converted);
        let r = self.push_out(chunk, &mut Out::Keep(&mut kept));
        self.converted = kept;
        r
    }

    /// As [`GgufStream::push`], each tensor handed to `sink(config, Hugging Face name, tensor)`
    /// as soon as it is converted (in the order of the file's data) instead of kept; then
    /// [`GgufStream::finish_to`]. Once the header is in, every tensor the model needs is checked
    /// to be in the file with the config's shape (the whole-file loader's errors) before any
    /// reaches the sink. Do not mix with [`GgufStream::push`].
    pub fn push_to(&mut self, chunk: &[u8], sink: &mut dyn FnMut(&ModelConfig, &str, HostTensor) -> Result<()>) -> Result<()> {
        self.to_sink = true;
        self.push_out(chunk, &mut Out::Sink(sink))
    }

    fn push_out(&mut self, chunk: &[u8], out: &mut Out) -> Result<()> {
        let at = self.received;
        self.received += chunk.len() as u64;
        if self.state.is_some() {
            return self.feed(at, chunk, out);
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
            HeaderParse::Done(header) => self.start(header, out),
        }
    }

    /// The header is complete: the tensors to convert are known; the bytes after the header
    /// already received are fed on.
    fn start(&mut self, header: GgufHeader, out: &mut Out) -> Result<()> {
        let config = header_config(&header)?;
        let field = if permuted_heads(&config).is_some() { "llama.block_count" } else { "qwen2.block_count" };
        config.check_sizes(header.file(), field, Some(header.tensors().len()))?;
        let mut names = BTreeMap::new();
        for (n, shape) in config.tensor_shapes() {
            if let Some(g) = gguf_name(&n) {
                if self.to_sink {
                    check_tensor(&header, &n, &g, &shape)?;
                }
                names.insert(g, (n, shape));
            }
        }
        let mut wanted: BTreeSet<&str> = names.keys().map(String::as_str).collect();
        wanted.insert("rope_freqs.weight");
        let t = header.tensors();
        let mut queue: Vec<usize> = (0..t.len()).filter(|&i| wanted.contains(t[i].name.as_str())).collect();
        queue.sort_by_key(|&i| t[i].offset);
        let permuted = permuted_heads(&config);
        self.state = Some(Parsed { header, config, permuted, queue, next: 0, names, rope: None });
        let prefix = std::mem::take(&mut self.buf);
        self.feed(0, &prefix, out)
    }

    /// `chunk` holds the file's bytes from offset `at`: the parts inside the next tensors to
    /// convert are kept until each is complete, then converted; the rest is dropped.
    fn feed(&mut self, mut at: u64, mut chunk: &[u8], out: &mut Out) -> Result<()> {
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
                let i = p.queue[p.next];
                deliver(p, i, data, out)?;
            } else {
                if self.buf.is_empty() {
                    self.buf.reserve_exact(info.nbytes);
                }
                self.buf.extend_from_slice(&chunk[..take]);
                if self.buf.len() < info.nbytes {
                    return Ok(());
                }
                // The received bytes dropped before the tensor goes on.
                let data = convert_tensor(&self.file, info, &std::mem::take(&mut self.buf), p.permuted)?;
                let i = p.queue[p.next];
                deliver(p, i, data, out)?;
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
        let mut kept = std::mem::take(&mut self.converted);
        let p = self.end(&mut Out::Keep(&mut kept))?;
        assemble(&p.header, p.config, TensorData::Converted(kept), quantize)
    }

    /// The end of a file fed with [`GgufStream::push_to`] (its last tensors, if empty, go to
    /// `sink`): the config and metadata; errors as [`GgufStream::finish`].
    pub fn finish_to(mut self, sink: &mut dyn FnMut(&ModelConfig, &str, HostTensor) -> Result<()>) -> Result<StreamedGguf> {
        let p = self.end(&mut Out::Sink(sink))?;
        let h = &p.header;
        let mut unused: Vec<String> =
            h.tensors().iter().map(|t| t.name.clone()).filter(|n| !p.names.contains_key(n) && n != "rope_freqs.weight").collect();
        unused.sort();
        Ok(StreamedGguf {
            version: h.version,
            metadata: h.metadata().iter().cloned().collect(),
            tensor_types: h.tensors().iter().map(|t| (t.name.clone(), t.ty)).collect(),
            unused,
            config: p.config,
        })
    }

    /// Feeds the empty tensors at the very end, checks that no tensor runs past the end, sets
    /// the rope factors.
    fn end(&mut self, out: &mut Out) -> Result<Parsed> {
        if self.state.is_some() {
            // Empty tensors at the very end.
            self.feed(self.received, &[], out)?;
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
        if let Some(f) = p.rope.take() {
            p.config.rope_freq_factors = Some(check_rope_factors(&self.file, f)?);
        }
        Ok(p)
    }
}

/// The converted tensor `data` of the header's tensor `i`: rope_freqs kept for the config, the
/// rest kept or handed to the sink.
fn deliver(p: &mut Parsed, i: usize, data: Vec<f32>, out: &mut Out) -> Result<()> {
    let name = &p.header.tensors()[i].name;
    if name == "rope_freqs.weight" {
        p.rope = Some(data);
        return Ok(());
    }
    match out {
        Out::Keep(m) => {
            m.insert(name.clone(), data);
        }
        Out::Sink(f) => {
            let (hf, shape) = &p.names[name];
            f(&p.config, hf, HostTensor { shape: shape.clone(), data })?;
        }
    }
    Ok(())
}
