//! A checkpoint's tensors, read from their file when asked for. GGUF files and safetensors shards
//! stay memory-mapped; a tensor is dequantized (or converted from f16/bf16) only when it is loaded,
//! so a caller working block by block holds one block's tensors, never the model.

use crate::{IoError, Result};
use candle_core::{DType, Tensor};
use shrink_core::qmatmul::QMatrix;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

/// Loads one stored tensor in the asked float type (its conversions, Q/K un-permutation and
/// transposes done), or makes it from others (a tensor of a lazily pruned checkpoint).
pub type LoadFn = dyn Fn(DType) -> Result<Tensor> + Send + Sync;

/// Reads one stored tensor's ggml blocks, rows in the model's order (a GGUF's quantized linears).
pub type PackedFn = dyn Fn() -> Result<QMatrix> + Send + Sync;

#[derive(Clone)]
enum Entry {
    Memory(Tensor),
    Stored {
        shape: Vec<usize>,
        dtype: DType,
        load: Arc<LoadFn>,
        packed: Option<Arc<PackedFn>>,
    },
}

/// The tensors of a [`crate::Checkpoint`] under Hugging Face names and layout: each one either in
/// memory or read from its (memory-mapped) file when loaded. Cloning is cheap: in-memory tensors
/// share their storage and stored ones share the map.
///
/// ```no_run
/// let checkpoint = shrink_io::load(std::path::Path::new("model.gguf"))?;
/// let name = "model.layers.0.mlp.down_proj.weight";
/// println!("{name}: {:?}", checkpoint.tensors.shape(name));
/// let w = checkpoint.tensors.get(name)?; // dequantized now, dropped with `w`
/// # Ok::<(), shrink_io::IoError>(())
/// ```
#[derive(Clone, Default)]
pub struct Tensors {
    path: PathBuf,
    entries: BTreeMap<String, Entry>,
}

impl std::fmt::Debug for Tensors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut map = f.debug_map();
        for (name, entry) in &self.entries {
            match entry {
                Entry::Memory(t) => map.entry(name, &format_args!("{:?} in memory", t.dims())),
                Entry::Stored { shape, .. } => map.entry(name, &format_args!("{shape:?} stored")),
            };
        }
        map.finish()
    }
}

impl From<BTreeMap<String, Tensor>> for Tensors {
    fn from(map: BTreeMap<String, Tensor>) -> Self {
        Tensors {
            path: PathBuf::new(),
            entries: map
                .into_iter()
                .map(|(name, t)| (name, Entry::Memory(t)))
                .collect(),
        }
    }
}

impl Tensors {
    /// No tensors yet; errors about the ones added later name `path`.
    pub fn empty(path: PathBuf) -> Self {
        Tensors {
            path,
            entries: BTreeMap::new(),
        }
    }

    /// Adds a tensor of `shape` that `load` reads from the file (or makes from other tensors)
    /// when asked for; `dtype` is the float type it loads in without conversion.
    pub fn insert_stored(
        &mut self,
        name: String,
        shape: Vec<usize>,
        dtype: DType,
        load: Arc<LoadFn>,
    ) -> Result<()> {
        if self
            .entries
            .insert(
                name.clone(),
                Entry::Stored {
                    shape,
                    dtype,
                    load,
                    packed: None,
                },
            )
            .is_some()
        {
            return Err(self.error(&name, "appears more than once".into()));
        }
        Ok(())
    }

    /// Gives a stored tensor a reader of its ggml blocks (see [`Tensors::packed`]).
    pub fn set_packed(&mut self, name: &str, read: Arc<PackedFn>) -> Result<()> {
        match self.entries.get_mut(name) {
            Some(Entry::Stored { packed, .. }) => {
                *packed = Some(read);
                Ok(())
            }
            _ => Err(self.error(name, "is not stored in a file".into())),
        }
    }

    /// The tensor's ggml blocks, read from the file now, when it is stored in a block type whose
    /// products shrink computes as llama.cpp does (`None` otherwise).
    pub fn packed(&self, name: &str) -> Result<Option<QMatrix>> {
        match self.entries.get(name) {
            Some(Entry::Stored {
                packed: Some(read), ..
            }) => read().map(Some),
            _ => Ok(None),
        }
    }

    fn error(&self, name: &str, message: String) -> IoError {
        IoError::Tensor {
            path: self.path.clone(),
            tensor: name.to_string(),
            message,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.entries.keys()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// A tensor's shape, known without loading it.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| match e {
            Entry::Memory(t) => t.dims(),
            Entry::Stored { shape, .. } => shape.as_slice(),
        })
    }

    /// The float type a tensor loads in without conversion (f32 for dequantized GGUF blocks, the
    /// stored type for safetensors).
    pub fn dtype(&self, name: &str) -> Option<DType> {
        self.entries.get(name).map(|e| match e {
            Entry::Memory(t) => t.dtype(),
            Entry::Stored { dtype, .. } => *dtype,
        })
    }

    /// The float type every tensor loads in without conversion, if they share one.
    pub fn common_dtype(&self) -> Option<DType> {
        let mut dtypes = self.names().filter_map(|n| self.dtype(n));
        let first = dtypes.next()?;
        dtypes.all(|d| d == first).then_some(first)
    }

    /// The tensor in f32, read from the file now if it is stored there.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        self.get_as(name, DType::F32)
    }

    /// The tensor in `dtype`, converted once from the stored type (a bf16 file read as bf16 is not
    /// widened to f32 first).
    pub fn get_as(&self, name: &str, dtype: DType) -> Result<Tensor> {
        match self.entries.get(name) {
            None => Err(self.error(name, "missing".into())),
            Some(Entry::Memory(t)) => t
                .to_dtype(dtype)
                .map_err(|e| self.error(name, e.to_string())),
            Some(Entry::Stored { load, .. }) => load(dtype),
        }
    }

    /// Puts a tensor in memory under `name`, replacing whatever was there.
    pub fn insert(&mut self, name: String, tensor: Tensor) {
        self.entries.insert(name, Entry::Memory(tensor));
    }

    /// Loads and removes a tensor.
    pub fn take(&mut self, name: &str) -> Result<Tensor> {
        let t = self.get(name)?;
        self.entries.remove(name);
        Ok(t)
    }

    /// Forgets a tensor (nothing is read).
    pub fn remove(&mut self, name: &str) -> bool {
        self.entries.remove(name).is_some()
    }

    /// Every tensor loaded in f32: the whole model in memory, for the paths that need it whole.
    pub fn load_all(&self) -> Result<BTreeMap<String, Tensor>> {
        self.entries
            .keys()
            .map(|name| Ok((name.clone(), self.get(name)?)))
            .collect()
    }
}
