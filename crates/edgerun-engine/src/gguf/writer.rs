//! A streaming GGUF (v3) writer: the header and every tensor's description first, then the
//! tensors' bytes one at a time, so a file far larger than memory (an 8B model) is written while
//! holding one tensor. Candle's `gguf_file::write` needs every tensor in memory at once.
//!
//! The file is written to `<path>.<pid>.partial` and renamed when [`GgufWriter::finish`] has
//! written every tensor, so a crash never leaves a truncated file under the real name; a writer
//! dropped before that (an error) removes its partial file.

use crate::error::{EngineError, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// GGUF's default data alignment (the reader assumes it without `general.alignment`).
const ALIGNMENT: u64 = 32;

/// One tensor of the file: its name, candle-order shape (rows first) and block type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorPlan {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: GgmlDType,
}

impl TensorPlan {
    /// Bytes of its data: elements / block size * block bytes.
    pub fn byte_len(&self) -> Result<usize> {
        let elements: usize = self.shape.iter().product();
        let block = self.dtype.block_size();
        let row = self.shape.last().copied().unwrap_or(1);
        if row % block != 0 {
            return Err(EngineError::Load(format!(
                "tensor `{}`: rows of {row} values are not a whole number of {:?} blocks ({block})",
                self.name, self.dtype
            )));
        }
        Ok(elements / block * self.dtype.type_size())
    }
}

/// GGML's on-disk type id.
pub fn ggml_type_id(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// Writes a GGUF file tensor by tensor, in the order given to [`GgufWriter::create`].
pub struct GgufWriter {
    out: BufWriter<File>,
    partial: PathBuf,
    path: PathBuf,
    plans: Vec<TensorPlan>,
    next: usize,
    finished: bool,
}

impl Drop for GgufWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

impl GgufWriter {
    /// Writes the header, the metadata and every tensor's description.
    pub fn create(
        path: &Path,
        metadata: &[(String, Value)],
        plans: Vec<TensorPlan>,
    ) -> Result<Self> {
        let io = |e: std::io::Error| EngineError::Load(format!("{}: {e}", path.display()));
        for plan in &plans {
            plan.byte_len()?;
        }
        let mut header = Vec::new();
        header.extend_from_slice(&0x4655_4747u32.to_le_bytes());
        header.extend_from_slice(&3u32.to_le_bytes());
        header.extend_from_slice(&(plans.len() as u64).to_le_bytes());
        header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (key, value) in metadata {
            put_string(&mut header, key);
            header.extend_from_slice(&value_type(value)?.to_le_bytes());
            put_value(&mut header, value)?;
        }
        let mut offset = 0u64;
        for plan in &plans {
            put_string(&mut header, &plan.name);
            header.extend_from_slice(&(plan.shape.len() as u32).to_le_bytes());
            for &d in plan.shape.iter().rev() {
                header.extend_from_slice(&(d as u64).to_le_bytes());
            }
            header.extend_from_slice(&ggml_type_id(plan.dtype).to_le_bytes());
            header.extend_from_slice(&offset.to_le_bytes());
            offset += (plan.byte_len()? as u64).next_multiple_of(ALIGNMENT);
        }
        let pad = (header.len() as u64).next_multiple_of(ALIGNMENT) - header.len() as u64;
        header.resize(header.len() + pad as usize, 0);
        let mut partial = path.as_os_str().to_owned();
        partial.push(format!(".{}.partial", std::process::id()));
        let partial = PathBuf::from(partial);
        let out = BufWriter::with_capacity(1 << 20, File::create(&partial).map_err(io)?);
        let mut this = Self {
            out,
            partial,
            path: path.to_owned(),
            plans,
            next: 0,
            finished: false,
        };
        // From here on, dropping `this` on an error removes the partial file.
        this.out.write_all(&header).map_err(io)?;
        Ok(this)
    }

    /// The tensors still to write, in order.
    pub fn remaining(&self) -> &[TensorPlan] {
        &self.plans[self.next..]
    }

    /// Writes the next tensor's data; `name` and the byte count must match the plan.
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let Some(plan) = self.plans.get(self.next) else {
            return Err(EngineError::Load(format!(
                "tensor `{name}` is beyond the {} planned",
                self.plans.len()
            )));
        };
        if plan.name != name {
            return Err(EngineError::Load(format!(
                "tensor `{name}` written where `{}` was planned",
                plan.name
            )));
        }
        let want = plan.byte_len()?;
        if data.len() != want {
            return Err(EngineError::Load(format!(
                "tensor `{name}`: {} bytes, {want} planned",
                data.len()
            )));
        }
        let io = |e: std::io::Error| EngineError::Load(format!("{}: {e}", self.path.display()));
        self.out.write_all(data).map_err(io)?;
        let pad = (want as u64).next_multiple_of(ALIGNMENT) - want as u64;
        self.out
            .write_all(&[0u8; ALIGNMENT as usize][..pad as usize])
            .map_err(io)?;
        self.next += 1;
        Ok(())
    }

    /// Checks every tensor was written, flushes, and moves the file into place.
    pub fn finish(mut self) -> Result<()> {
        if self.next != self.plans.len() {
            return Err(EngineError::Load(format!(
                "{} of {} tensors written",
                self.next,
                self.plans.len()
            )));
        }
        let io = |e: std::io::Error| EngineError::Load(format!("{}: {e}", self.path.display()));
        self.out.flush().map_err(io)?;
        self.out.get_ref().sync_all().map_err(io)?;
        std::fs::rename(&self.partial, &self.path).map_err(io)?;
        self.finished = true;
        Ok(())
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn value_type(v: &Value) -> Result<u32> {
    Ok(match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    })
}

fn put_value(out: &mut Vec<u8>, v: &Value) -> Result<()> {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_string(out, s),
        Value::Array(items) => {
            let elem_type = match items.first() {
                Some(first) => value_type(first)?,
                None => 4, // an empty array's element type does not matter (u32, as llama.cpp)
            };
            for item in items {
                if value_type(item)? != elem_type {
                    return Err(EngineError::Load("a GGUF array mixes value types".into()));
                }
            }
            out.extend_from_slice(&elem_type.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(name: &str) -> TensorPlan {
        TensorPlan {
            name: name.into(),
            shape: vec![4, 32],
            dtype: GgmlDType::Q8_0,
        }
    }

    #[test]
    fn a_writer_that_does_not_finish_leaves_no_file() {
        let dir = std::env::temp_dir().join(format!("edgerun-writer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("never.gguf");
        let meta = [(
            "general.architecture".to_string(),
            Value::String("llama".into()),
        )];
        let mut w = GgufWriter::create(&out, &meta, vec![plan("a"), plan("b")]).unwrap();
        w.write_tensor("a", &[0u8; 4 * 34]).unwrap();
        // Wrong order and wrong size are errors, not corrupt files.
        assert!(w.write_tensor("c", &[0u8; 4 * 34]).is_err());
        assert!(w.write_tensor("b", &[0u8; 3]).is_err());
        drop(w);
        assert!(
            std::fs::read_dir(&dir).unwrap().next().is_none(),
            "a partial file was left"
        );
        // A plan whose rows are not whole blocks is refused before any file is created.
        let bad = TensorPlan {
            shape: vec![4, 33],
            ..plan("x")
        };
        assert!(GgufWriter::create(&out, &meta, vec![bad]).is_err());
        assert!(std::fs::read_dir(&dir).unwrap().next().is_none());
        // Finished, it is a GGUF candle reads.
        let mut w = GgufWriter::create(&out, &meta, vec![plan("a")]).unwrap();
        w.write_tensor("a", &[0u8; 4 * 34]).unwrap();
        w.finish().unwrap();
        let ct = candle_core::quantized::gguf_file::Content::read(&mut File::open(&out).unwrap())
            .unwrap();
        assert_eq!(ct.tensor_infos["a"].shape.dims(), &[4, 32]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
