//! Hugging Face model folders (no shader; CPU only): config.json plus model.safetensors, or
//! shards listed in model.safetensors.index.json (`weight_map`: tensor name -> shard file).
//! The folder is a set of named byte blobs ([`ModelFiles`]) so that the browser can hand in
//! files; [`MmapDir`] (native only) memory-maps a directory. Tensor names are the Hugging Face
//! names, kept verbatim. F32, F16 and BF16 tensors become f32; projection weights stored in
//! bitsandbytes' 4-bit layout (`W` + `W.absmax` + `W.quant_map` + `W.quant_state.bitsandbytes__nf4`
//! [+ nested]) become [`Nf4Tensor`](crate::quant::Nf4Tensor)s.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::Value;

use super::safetensors::SafeTensorsFile;
use super::{HostModel, HostTensor, HostWeight, TensorSource};
use crate::model::config::ModelConfig;
use crate::io::bnb::{read_bnb_nf4, NF4_QUANT_STATE_SUFFIX};
use crate::{Error, Result};

/// The config file of a folder.
pub const CONFIG_FILE: &str = "config.json";
/// The single-file checkpoint.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The files of a model folder, by name relative to the folder ("config.json",
/// "model-00001-of-00002.safetensors", ...).
pub trait ModelFiles {
    /// The bytes of file `name`, None if the folder has no such file.
    fn file(&self, name: &str) -> Option<&[u8]>;
    /// How file `name` is named in errors (default: `name`; [`MmapDir`] gives the full path).
    fn display(&self, name: &str) -> String {
        name.to_owned()
    }
}

impl<S: AsRef<[u8]>> ModelFiles for HashMap<String, S> {
    fn file(&self, name: &str) -> Option<&[u8]> {
        self.get(name).map(AsRef::as_ref)
    }
}

impl<S: AsRef<[u8]>> ModelFiles for BTreeMap<String, S> {
    fn file(&self, name: &str) -> Option<&[u8]> {
        self.get(name).map(AsRef::as_ref)
    }
}

/// The bitsandbytes companions of an NF4 weight `W` (all `W.<suffix>`).
const BNB_SUFFIXES: [&str; 5] = [
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    NF4_QUANT_STATE_SUFFIX,
];

struct Shard<'a> {
    label: String,
    st: SafeTensorsFile<'a>,
    /// The safetensors crate's view (bitsandbytes' reader takes it), made on first use.
    view: Option<::safetensors::SafeTensors<'a>>,
}

struct HfSource<'a> {
    config_label: String,
    shards: Vec<Shard<'a>>,
    /// tensor -> shard index, for sharded checkpoints.
    weight_map: Option<HashMap<String, usize>>,
    index_label: String,
    used: BTreeSet<String>,
}

impl<'a> HfSource<'a> {
    fn locate(&self, name: &str) -> Result<usize> {
        match &self.weight_map {
            Some(map) => {
                let &si = map.get(name).ok_or_else(|| {
                    Error::format(&self.index_label, format!("weight_map has no entry for tensor `{name}` (missing tensor)"))
                })?;
                if !self.shards[si].st.contains(name) {
                    return Err(Error::format(
                        &self.shards[si].label,
                        format!("missing tensor `{name}` (model.safetensors.index.json puts it in this shard)"),
                    ));
                }
                Ok(si)
            }
            None => {
                if self.shards[0].st.contains(name) {
                    Ok(0)
                } else {
                    Err(Error::format(&self.shards[0].label, format!("missing tensor `{name}`")))
                }
            }
        }
    }

    fn read_nf4(&mut self, si: usize, name: &str, shape: &[usize]) -> Result<HostWeight> {
        let shard = &mut self.shards[si];
        if shard.view.is_none() {
            let v = ::safetensors::SafeTensors::deserialize(shard.st.bytes()).map_err(|e| {
                Error::format(&shard.label, format!("not a valid safetensors file for bitsandbytes' reader: {e}"))
            })?;
            shard.view = Some(v);
        }
        let view = shard.view.as_ref().expect("set above");
        let t = read_bnb_nf4(&shard.label, view, name)?;
        if t.shape != shape {
            return Err(Error::format(
                &shard.label,
                format!(
                    "tensor `{name}`: NF4 shape {:?} (from its quant_state), expected {shape:?} from {}",
                    t.shape, self.config_label
                ),
            ));
        }
        self.used.insert(name.to_owned());
        for s in BNB_SUFFIXES {
            self.used.insert(format!("{name}{s}"));
        }
        Ok(HostWeight::Nf4(t))
    }
}

impl TensorSource for HfSource<'_> {
    fn present(&self) -> (String, &'static str, usize) {
        (self.config_label.clone(), "num_hidden_layers", self.shards.iter().map(|s| s.st.tensors().len()).sum())
    }
    fn fetch(&mut self, name: &str, shape: &[usize], projection: bool) -> Result<HostWeight> {
        let si = self.locate(name)?;
        if projection && self.shards[si].st.contains(&format!("{name}{NF4_QUANT_STATE_SUFFIX}")) {
            return self.read_nf4(si, name, shape);
        }
        let shard = &self.shards[si];
        let info = shard.st.info(name).expect("located");
        if info.shape != shape {
            return Err(Error::format(
                &shard.label,
                format!(
                    "tensor `{name}`: shape {:?}, expected {shape:?} from {}",
                    info.shape, self.config_label
                ),
            ));
        }
        let data = shard.st.to_f32(name)?;
        self.used.insert(name.to_owned());
        Ok(HostWeight::F32(HostTensor { shape: shape.to_vec(), data }))
    }
}

/// Loads a Hugging Face folder: config.json ([`ModelConfig::from_json`]), then
/// model.safetensors, or (when that is absent) model.safetensors.index.json and its shards. Every
/// tensor the config implies must be present with the implied shape; errors name the file, the
/// tensor, and the expected and actual shapes. Extra tensors are listed in
/// [`HostModel::unused`].
pub fn load_hf(files: &dyn ModelFiles) -> Result<HostModel> {
    load_hf_with(files, None)
}

/// As [`load_hf`], with every projection quantized to NF4 (blocksize, double quantization) as it
/// is read when `quantize` is given (QLoRA: the f32 model never exists on the host).
pub fn load_hf_with(files: &dyn ModelFiles, quantize: Option<(usize, bool)>) -> Result<HostModel> {
    let config_label = files.display(CONFIG_FILE);
    let config_bytes = files
        .file(CONFIG_FILE)
        .ok_or_else(|| Error::format(&config_label, "file not found in the model folder"))?;
    let config = ModelConfig::from_json(&config_label, config_bytes)?;

    let index_label = files.display(INDEX_FILE);
    let (shard_names, weight_map) = if files.file(WEIGHTS_FILE).is_some() {
        (vec![WEIGHTS_FILE.to_owned()], None)
    } else if let Some(index) = files.file(INDEX_FILE) {
        let (names, map) = parse_index(&index_label, index, files)?;
        (names, Some(map))
    } else {
        return Err(Error::format(
            files.display(WEIGHTS_FILE),
            format!("file not found in the model folder, and no {INDEX_FILE} either"),
        ));
    };

    let mut shards = Vec::with_capacity(shard_names.len());
    for name in &shard_names {
        let label = files.display(name);
        let bytes = files.file(name).expect("checked by parse_index");
        let st = SafeTensorsFile::parse(&label, bytes)?;
        shards.push(Shard { label, st, view: None });
    }
    let mut src = HfSource {
        config_label,
        shards,
        weight_map,
        index_label,
        used: BTreeSet::new(),
    };
    let mut model = HostModel::build_with(config, &mut src, quantize)?;
    let mut unused: Vec<String> = src
        .shards
        .iter()
        .flat_map(|s| s.st.tensors().iter().map(|t| t.name.clone()))
        .filter(|n| !src.used.contains(n))
        .collect();
    unused.sort();
    model.unused = unused;
    Ok(model)
}

/// Parses model.safetensors.index.json: the shard file names (sorted) and tensor -> shard index.
fn parse_index(label: &str, bytes: &[u8], files: &dyn ModelFiles) -> Result<(Vec<String>, HashMap<String, usize>)> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| Error::format(label, format!("not valid JSON ({e})")))?;
    let map = v
        .get("weight_map")
        .ok_or_else(|| Error::format(label, "missing field `weight_map`"))?
        .as_object()
        .ok_or_else(|| Error::format(label, "field `weight_map` is not an object"))?;
    let mut shard_names = BTreeSet::new();
    for (tensor, shard) in map {
        let shard = shard
            .as_str()
            .ok_or_else(|| Error::format(label, format!("weight_map entry `{tensor}` is not a file name")))?;
        if files.file(shard).is_none() {
            return Err(Error::format(
                label,
                format!("weight_map entry `{tensor}` names shard `{shard}`, which is not in the folder"),
            ));
        }
        shard_names.insert(shard.to_owned());
    }
    let shard_names: Vec<String> = shard_names.into_iter().collect();
    let index = map
        .iter()
        .map(|(t, s)| {
            let s = s.as_str().expect("checked");
            (t.clone(), shard_names.binary_search_by(|n| n.as_str().cmp(s)).expect("inserted"))
        })
        .collect();
    Ok((shard_names, index))
}

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};

    use super::ModelFiles;
    use crate::io::HostModel;
    use crate::{Error, Result};

    enum Blob {
        Map(memmap2::Mmap),
        Empty,
    }

    /// A model folder on disk: every regular file directly in it whose name ends in `.json`,
    /// `.safetensors` or `.jinja`, memory-mapped (native only). The files must not be changed
    /// while this value lives (the mapping would change under the loader).
    pub struct MmapDir {
        dir: PathBuf,
        files: BTreeMap<String, Blob>,
    }

    impl MmapDir {
        /// Maps the `.json`, `.safetensors` and `.jinja` files of `dir`; an unreadable folder
        /// or file is an `Error::Format` naming it.
        pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
            let dir = dir.as_ref().to_path_buf();
            let entries = std::fs::read_dir(&dir)
                .map_err(|e| Error::format(dir.display().to_string(), format!("cannot read the model folder: {e}")))?;
            let mut files = BTreeMap::new();
            for entry in entries {
                let entry = entry
                    .map_err(|e| Error::format(dir.display().to_string(), format!("cannot list the model folder: {e}")))?;
                let path = entry.path();
                let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
                    continue;
                };
                if !(name.ends_with(".json") || name.ends_with(".safetensors") || name.ends_with(".jinja")) {
                    continue;
                }
                let label = path.display().to_string();
                // Stat before opening: opening a FIFO blocks until a writer appears.
                let kind = std::fs::metadata(&path).map_err(|e| Error::format(&label, format!("cannot stat: {e}")))?;
                if !kind.is_file() {
                    return Err(Error::format(
                        &label,
                        if kind.is_dir() { "is a folder, not a file" } else { "not a regular file (a FIFO, socket or device): refused" },
                    ));
                }
                let file = std::fs::File::open(&path).map_err(|e| Error::format(&label, format!("cannot open: {e}")))?;
                let meta = file.metadata().map_err(|e| Error::format(&label, format!("cannot stat: {e}")))?;
                if !meta.is_file() {
                    continue;
                }
                let blob = if meta.len() == 0 {
                    Blob::Empty
                } else {
                    // SAFETY: the mapping is read-only; the type's contract (documented above)
                    // is that the files are not modified while it is alive.
                    Blob::Map(unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::format(&label, format!("cannot memory-map: {e}")))?)
                };
                files.insert(name, blob);
            }
            Ok(MmapDir { dir, files })
        }

        /// The names of the mapped files, sorted.
        pub fn names(&self) -> impl Iterator<Item = &str> {
            self.files.keys().map(String::as_str)
        }
    }

    impl ModelFiles for MmapDir {
        fn file(&self, name: &str) -> Option<&[u8]> {
            self.files.get(name).map(|b| match b {
                Blob::Map(m) => &m[..],
                Blob::Empty => &[][..],
            })
        }
        fn display(&self, name: &str) -> String {
            self.dir.join(name).display().to_string()
        }
    }

    /// Loads the Hugging Face folder `dir` (memory-mapped; see [`super::load_hf`]).
    pub fn load_hf_dir(dir: impl AsRef<Path>) -> Result<HostModel> {
        super::load_hf(&MmapDir::open(dir)?)
    }
}

#[cfg(not(target_arch = "wasm32"))]
pub use native::{load_hf_dir, MmapDir};
