//! The models one node serves: every `--model`, resolved, fetched and named, before anything
//! loads.
//!
//! A node serves any number of text-generation models (each a GGUF with its own engine,
//! scheduler and KV pool) and of embedding models (each an encoder with its own batching
//! thread), each under its own names: its file or directory name, its catalog name when
//! `--model` was one, and an alias given as `--model NAME=SPEC`. `--served-as` names go to the
//! first `--model`. A name may belong to one model only.
//!
//! Memory: every model's weights load in parallel, each on a thread of its own; the KV budget
//! is sized once they are all in, so their weights are already counted as used (on a GPU, what
//! `--gpu-memory-fraction` leaves once the largest step's activations of every text-generation
//! model and each embedder's activations for its largest batch (`Embedder::activation_bytes`,
//! bounded by `--embed-batch-tokens`) are set aside; on the CPU, the share of what is available
//! then). That budget is split evenly among the text-generation models, unless
//! `--kv-cache-mib` gives each its own ([`kv_budgets`]).

use crate::models::{self, Catalog, ModelTask, ResolvedModel};
use anyhow::{bail, Context};
use std::collections::BTreeSet;
use std::path::PathBuf;

/// One `--model`, resolved and fetched.
#[derive(Debug, Clone)]
pub struct PlannedModel {
    pub path: PathBuf,
    pub resolved: ResolvedModel,
    /// Every name it answers to, its own first.
    pub names: Vec<String>,
    /// The catalog's description, or one made from its file name.
    pub description: String,
}

/// Every model of the node.
#[derive(Debug, Clone, Default)]
pub struct ModelSet {
    /// In `--model` order.
    pub generation: Vec<PlannedModel>,
    pub embeddings: Vec<PlannedModel>,
}

/// Splits `NAME=SPEC` (an alias for the model) from a plain `SPEC`. A spec that exists as a
/// path is never split, so paths holding `=` still work.
pub fn split_alias(arg: &str) -> (Option<&str>, &str) {
    if std::path::Path::new(arg).exists() {
        return (None, arg);
    }
    match arg.split_once('=') {
        Some((name, spec)) if !name.is_empty() && !spec.is_empty() => (Some(name), spec),
        _ => (None, arg),
    }
}

impl ModelSet {
    /// Resolves and fetches every `--model` (downloading from the Hub as needed: blocking).
    pub fn plan(specs: &[String], served_as: &[String], catalog: &Catalog) -> anyhow::Result<Self> {
        if specs.is_empty() {
            bail!("no --model (EDGERUN_MODEL) given");
        }
        let mut set = ModelSet::default();
        let mut taken = BTreeSet::new();
        for (i, arg) in specs.iter().enumerate() {
            let (alias, spec) = split_alias(arg);
            let resolved =
                models::resolve(spec, catalog).with_context(|| format!("--model {arg}"))?;
            let path = models::fetch(&resolved.source).with_context(|| format!("--model {arg}"))?;
            let mut names = vec![models::own_name(&path)];
            names.extend(resolved.catalog_name.clone());
            names.extend(alias.map(str::to_string));
            if i == 0 {
                names.extend(served_as.iter().filter(|s| !s.is_empty()).cloned());
            }
            let mut seen = BTreeSet::new();
            names.retain(|n| seen.insert(n.clone()));
            for name in &names {
                if !taken.insert(name.clone()) {
                    bail!("--model {arg}: the name `{name}` is already another model's");
                }
            }
            let file_name = path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_else(|| spec.to_string());
            let description = resolved
                .catalog_name
                .as_ref()
                .and_then(|n| catalog.models.get(n))
                .and_then(|e| e.description.clone())
                .unwrap_or_else(|| format!("{file_name}, served by edgerun"));
            let planned = PlannedModel {
                path,
                resolved,
                names,
                description,
            };
            match planned.resolved.task {
                ModelTask::TextGeneration => set.generation.push(planned),
                ModelTask::TextEmbeddings => set.embeddings.push(planned),
            }
        }
        Ok(set)
    }
}

/// Each text-generation model's KV cache budget in bytes, in `--model` order, from
/// `--kv-cache-mib` (`mib`): none given → `None` for each (the device's budget for all of them,
/// split evenly: [`even_share`]); one size → that size for each; one per model → each its own.
/// Refused: any other count, or a size too large to hold in bytes.
pub fn kv_budgets(mib: &[usize], models: usize) -> anyhow::Result<Vec<Option<usize>>> {
    let bytes = |m: usize| {
        m.checked_mul(1 << 20)
            .with_context(|| format!("--kv-cache-mib (EDGERUN_KV_CACHE_MIB) {m} is too large"))
    };
    match mib.len() {
        0 => Ok(vec![None; models]),
        1 => Ok(vec![Some(bytes(mib[0])?); models]),
        n if n == models => mib.iter().map(|&m| bytes(m).map(Some)).collect(),
        n => bail!(
            "--kv-cache-mib (EDGERUN_KV_CACHE_MIB) gives {n} sizes for {models} text-generation \
             model(s): give one size for each, or one per model in --model order"
        ),
    }
}

/// One text-generation model's share of the device's KV budget for all `models` of them.
pub fn even_share(total: usize, models: usize) -> usize {
    total / models.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_split_at_the_first_equals_sign() {
        assert_eq!(split_alias("m.gguf"), (None, "m.gguf"));
        assert_eq!(
            split_alias("@cf/baai/bge-small-en-v1.5=models/cache/minilm"),
            (Some("@cf/baai/bge-small-en-v1.5"), "models/cache/minilm")
        );
        assert_eq!(split_alias("=x"), (None, "=x"));
        assert_eq!(split_alias("x="), (None, "x="));
    }

    #[test]
    fn several_models_under_distinct_names() {
        let dir = std::env::temp_dir().join(format!("edgerun-set-{}", std::process::id()));
        let enc = dir.join("enc");
        std::fs::create_dir_all(&enc).unwrap();
        let gguf = dir.join("a.gguf");
        std::fs::write(&gguf, b"").unwrap();
        let c = Catalog::default();
        let s = |p: &std::path::Path| p.to_string_lossy().into_owned();
        let set = ModelSet::plan(
            &[s(&gguf), format!("emb={}", s(&enc))],
            &["chat".into()],
            &c,
        )
        .unwrap();
        assert_eq!(set.generation[0].names, ["a", "chat"]);
        assert_eq!(set.embeddings[0].names, ["enc", "emb"]);
        let other = dir.join("b.gguf");
        std::fs::write(&other, b"").unwrap();
        let two = ModelSet::plan(&[s(&gguf), s(&other)], &["chat".into()], &c).unwrap();
        let names: Vec<_> = two.generation.iter().map(|g| g.names.clone()).collect();
        assert_eq!(names, [vec!["a", "chat"], vec!["b"]]);
        let clash = ModelSet::plan(&[s(&gguf), format!("a={}", s(&enc))], &[], &c).unwrap_err();
        assert!(
            format!("{clash:#}").contains("already another model's"),
            "{clash:#}"
        );
        assert!(ModelSet::plan(&[], &[], &c).is_err());
    }

    #[test]
    fn kv_budgets_one_for_all_one_each_or_an_even_share() {
        assert_eq!(kv_budgets(&[], 2).unwrap(), [None, None]);
        assert_eq!(
            kv_budgets(&[64], 2).unwrap(),
            [Some(64 << 20), Some(64 << 20)]
        );
        assert_eq!(
            kv_budgets(&[64, 256], 2).unwrap(),
            [Some(64 << 20), Some(256 << 20)]
        );
        let wrong = kv_budgets(&[64, 256], 3).unwrap_err().to_string();
        assert!(wrong.contains("2 sizes for 3"), "{wrong}");
        assert!(kv_budgets(&[usize::MAX], 1).is_err());
        assert_eq!(even_share(1000, 3), 333);
        assert_eq!(even_share(1000, 0), 1000);
    }
}
