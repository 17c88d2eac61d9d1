//! Several adapters on one base: named [`LoraSet`]s uploaded next to one loaded model, one of
//! them (or none: the base alone) chosen per request. The base weights are never copied or
//! reloaded; each adapter costs only its own A and B on the device.

use super::{HostAdapter, LoraConfig};
use crate::gpu::GpuContext;
use crate::model::llama::{LlamaConfig, LoraSet};
use crate::{Error, Result};

/// One adapter of an [`AdapterSet`].
struct Entry {
    name: String,
    config: LoraConfig,
    set: LoraSet,
}

/// Named adapters for one base model, with the one in use.
#[derive(Default)]
pub struct AdapterSet {
    entries: Vec<Entry>,
    active: Option<usize>,
    base: LoraSet,
}

impl AdapterSet {
    /// An empty set: requests run on the base model.
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks `adapter` against `model` and uploads its A and B under `name` (a new name; the
    /// active adapter does not change). Device memory grows by the adapter's A and B only.
    pub fn add(&mut self, ctx: &GpuContext, model: &LlamaConfig, name: &str, adapter: &HostAdapter) -> Result<()> {
        self.check_new(name)?;
        adapter.check(model)?;
        let set = adapter.upload(ctx)?;
        self.entries.push(Entry { name: name.to_owned(), config: adapter.config.clone(), set });
        Ok(())
    }

    /// Adds an adapter already on the device (shared, not copied) under `name`.
    pub fn insert(&mut self, name: &str, config: LoraConfig, set: LoraSet) -> Result<()> {
        self.check_new(name)?;
        self.entries.push(Entry { name: name.to_owned(), config, set });
        Ok(())
    }

    fn check_new(&self, name: &str) -> Result<()> {
        if name.is_empty() {
            return Err(Error::Invalid("an adapter needs a non-empty name".into()));
        }
        if self.index(name).is_some() {
            return Err(Error::Invalid(format!("an adapter named {name:?} is already loaded")));
        }
        Ok(())
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.entries.iter().position(|e| e.name == name)
    }

    fn unknown(&self, name: &str) -> Error {
        let names = self.names();
        Error::Invalid(format!(
            "no adapter named {name:?} (loaded: {})",
            if names.is_empty() { "none".to_owned() } else { names.join(", ") }
        ))
    }

    /// Removes `name` (its device buffers are freed once no request holds them); the base model
    /// is in use afterwards if it was the active one. False when there is no such adapter.
    pub fn remove(&mut self, name: &str) -> bool {
        let Some(i) = self.index(name) else { return false };
        self.entries.remove(i);
        self.active = match self.active {
            Some(a) if a == i => None,
            Some(a) if a > i => Some(a - 1),
            a => a,
        };
        true
    }

    /// Makes `name` the adapter in use (None: the base model alone).
    pub fn use_adapter(&mut self, name: Option<&str>) -> Result<()> {
        self.active = match name {
            None => None,
            Some(n) => Some(self.index(n).ok_or_else(|| self.unknown(n))?),
        };
        Ok(())
    }

    /// The name of the adapter in use (None: the base model).
    pub fn active_name(&self) -> Option<&str> {
        self.active.map(|i| self.entries[i].name.as_str())
    }

    /// The adapter in use (an empty set for the base model).
    pub fn active(&self) -> &LoraSet {
        self.active.map_or(&self.base, |i| &self.entries[i].set)
    }

    /// The adapter `name` for one request without changing the one in use (None: the base).
    pub fn get(&self, name: Option<&str>) -> Result<&LoraSet> {
        match name {
            None => Ok(&self.base),
            Some(n) => self.index(n).map(|i| &self.entries[i].set).ok_or_else(|| self.unknown(n)),
        }
    }

    /// The config of adapter `name`.
    pub fn config(&self, name: &str) -> Option<&LoraConfig> {
        self.index(name).map(|i| &self.entries[i].config)
    }

    /// The names, in the order they were added.
    pub fn names(&self) -> Vec<&str> {
        self.entries.iter().map(|e| e.name.as_str()).collect()
    }

    /// Number of adapters.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no adapter is loaded.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of every adapter's A and B on the device (4 per element).
    pub fn device_bytes(&self) -> usize {
        self.entries.iter().flat_map(|e| e.set.params()).map(|p| p.value.shape().iter().product::<usize>() * 4).sum()
    }
}
