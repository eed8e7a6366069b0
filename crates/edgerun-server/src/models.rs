//! Where model files come from: a local path, a Hugging Face reference, or a Workers AI name
//! from the catalog; and what kind of model it is. A GGUF file is a text-generation model; a
//! directory, an `hf:owner/repo` reference without a file, or a catalog entry with
//! `task = "text-embeddings"` is an embedding model (a Hugging Face encoder directory:
//! `config.json`, `model.safetensors`, `tokenizer.json` and sentence-transformers' pipeline
//! files, [`ENCODER_FILES`]).

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// The catalog shipped with the binary (`models/catalog.toml`).
pub const BUILTIN_CATALOG: &str = include_str!("../../../models/catalog.toml");

#[derive(Debug, Error)]
pub enum ModelSourceError {
    #[error("model file {0} does not exist")]
    Missing(PathBuf),
    #[error("`{0}` is not a model path, an `hf:owner/repo/file.gguf` reference or a catalog name")]
    Unknown(String),
    #[error("bad catalog: {0}")]
    Catalog(String),
    #[error("{file} from {repo} is not in the Hugging Face cache and HF_HUB_OFFLINE is set")]
    Offline { repo: String, file: String },
    #[error("downloading {file} from {repo}: {detail}")]
    Download {
        repo: String,
        file: String,
        detail: String,
    },
}

/// One catalog entry: a Workers AI model name mapped to a GGUF on the Hugging Face Hub.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct CatalogEntry {
    /// `owner/repo/path/to/file.gguf` on the Hub.
    pub hf: String,
    /// Prompt plus output tokens allowed, as Workers AI documents for the model.
    pub context_window: Option<usize>,
    #[serde(default)]
    pub revision: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    /// `text-generation` (the default: `hf` names a GGUF file) or `text-embeddings` (`hf`
    /// names a repository of an encoder).
    #[serde(default)]
    pub task: Option<String>,
}

/// The files of an encoder directory: required, then optional (sentence-transformers').
pub const ENCODER_FILES: (&[&str], &[&str]) = (
    &["config.json", "model.safetensors", "tokenizer.json"],
    &[
        "modules.json",
        "1_Pooling/config.json",
        "sentence_bert_config.json",
    ],
);

/// What a model does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelTask {
    TextGeneration,
    TextEmbeddings,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct Catalog {
    #[serde(default)]
    pub models: BTreeMap<String, CatalogEntry>,
}

impl Catalog {
    pub fn parse(text: &str) -> Result<Self, ModelSourceError> {
        toml::from_str(text).map_err(|e| ModelSourceError::Catalog(e.to_string()))
    }

    pub fn builtin() -> Self {
        Self::parse(BUILTIN_CATALOG).expect("the built-in catalog parses (tested)")
    }
}

/// A `--model` argument, resolved.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    Path(PathBuf),
    Hub {
        repo: String,
        file: String,
        revision: String,
    },
    /// A whole encoder repository ([`ENCODER_FILES`]).
    HubEncoder {
        repo: String,
        revision: String,
    },
}

/// What `--model` resolved to: where to load from, and facts the catalog adds.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedModel {
    pub source: ModelSource,
    /// The catalog name, when `--model` was one (served under that name too).
    pub catalog_name: Option<String>,
    pub context_window: Option<usize>,
    pub task: ModelTask,
}

/// Splits `owner/repo/path/file.gguf` into the repository and the file inside it.
pub fn parse_hub_reference(r: &str) -> Option<(String, String)> {
    let mut parts = r.splitn(3, '/');
    let (owner, repo, file) = (parts.next()?, parts.next()?, parts.next()?);
    if owner.is_empty() || repo.is_empty() || file.is_empty() {
        return None;
    }
    Some((format!("{owner}/{repo}"), file.to_string()))
}

/// `owner/repo` (exactly two non-empty parts).
fn parse_hub_repo(r: &str) -> Option<String> {
    let (owner, repo) = r.split_once('/')?;
    (!owner.is_empty() && !repo.is_empty() && !repo.contains('/')).then(|| r.to_string())
}

pub fn resolve(spec: &str, catalog: &Catalog) -> Result<ResolvedModel, ModelSourceError> {
    if let Some(r) = spec.strip_prefix("hf:") {
        if let Some(repo) = parse_hub_repo(r) {
            return Ok(ResolvedModel {
                source: ModelSource::HubEncoder {
                    repo,
                    revision: "main".into(),
                },
                catalog_name: None,
                context_window: None,
                task: ModelTask::TextEmbeddings,
            });
        }
        let (repo, file) =
            parse_hub_reference(r).ok_or_else(|| ModelSourceError::Unknown(spec.to_string()))?;
        return Ok(ResolvedModel {
            source: ModelSource::Hub {
                repo,
                file,
                revision: "main".into(),
            },
            catalog_name: None,
            context_window: None,
            task: ModelTask::TextGeneration,
        });
    }
    if let Some(entry) = catalog.models.get(spec) {
        let revision = entry.revision.clone().unwrap_or_else(|| "main".into());
        let bad = || ModelSourceError::Catalog(format!("{spec}: bad hf `{}`", entry.hf));
        let (source, task) = match entry.task.as_deref() {
            None | Some("text-generation") => {
                let (repo, file) = parse_hub_reference(&entry.hf).ok_or_else(bad)?;
                (
                    ModelSource::Hub {
                        repo,
                        file,
                        revision,
                    },
                    ModelTask::TextGeneration,
                )
            }
            Some("text-embeddings") => (
                ModelSource::HubEncoder {
                    repo: parse_hub_repo(&entry.hf).ok_or_else(bad)?,
                    revision,
                },
                ModelTask::TextEmbeddings,
            ),
            Some(other) => {
                return Err(ModelSourceError::Catalog(format!(
                    "{spec}: task `{other}` is not text-generation or text-embeddings"
                )))
            }
        };
        return Ok(ResolvedModel {
            source,
            catalog_name: Some(spec.to_string()),
            context_window: entry.context_window,
            task,
        });
    }
    let path = PathBuf::from(spec);
    if path.exists() {
        let task = if path.is_dir() {
            ModelTask::TextEmbeddings
        } else {
            ModelTask::TextGeneration
        };
        return Ok(ResolvedModel {
            source: ModelSource::Path(path),
            catalog_name: None,
            context_window: None,
            task,
        });
    }
    if !spec.starts_with('@')
        && (spec.ends_with(".gguf") || spec.contains(std::path::MAIN_SEPARATOR))
    {
        return Err(ModelSourceError::Missing(path));
    }
    Err(ModelSourceError::Unknown(spec.to_string()))
}

fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
        .unwrap_or(false)
}

/// The local file for a source, downloading from the Hub (with a progress bar) when needed.
/// Honours `HF_HOME`, `HF_ENDPOINT` and `HF_TOKEN` like the Python client, and
/// `HF_HUB_OFFLINE` (cache only). Blocking: call it before serving or on a blocking thread.
pub fn fetch(source: &ModelSource) -> Result<PathBuf, ModelSourceError> {
    match source {
        ModelSource::Path(p) if p.exists() => Ok(p.clone()),
        ModelSource::Path(p) => Err(ModelSourceError::Missing(p.clone())),
        ModelSource::Hub {
            repo,
            file,
            revision,
        } => {
            let hf_repo = hf_hub::Repo::with_revision(
                repo.clone(),
                hf_hub::RepoType::Model,
                revision.clone(),
            );
            let cache = hf_hub::Cache::from_env();
            if let Some(p) = cache.repo(hf_repo.clone()).get(file) {
                return Ok(p);
            }
            if hub_offline() {
                return Err(ModelSourceError::Offline {
                    repo: repo.clone(),
                    file: file.clone(),
                });
            }
            let err = |detail: String| ModelSourceError::Download {
                repo: repo.clone(),
                file: file.clone(),
                detail,
            };
            let api = hf_hub::api::sync::ApiBuilder::from_env()
                .with_progress(true)
                .build()
                .map_err(|e| err(e.to_string()))?;
            api.repo(hf_repo).get(file).map_err(|e| err(e.to_string()))
        }
        ModelSource::HubEncoder { repo, revision } => {
            let (required, optional) = ENCODER_FILES;
            let mut dir = None;
            for file in required {
                let path = fetch(&ModelSource::Hub {
                    repo: repo.clone(),
                    file: file.to_string(),
                    revision: revision.clone(),
                })?;
                dir = path.parent().map(Path::to_path_buf);
            }
            for file in optional {
                // Absent from the repository (or the offline cache): the model's defaults.
                let _ = fetch(&ModelSource::Hub {
                    repo: repo.clone(),
                    file: file.to_string(),
                    revision: revision.clone(),
                });
            }
            // The Hub cache keeps a revision's files side by side in one snapshot folder.
            dir.ok_or_else(|| ModelSourceError::Catalog(format!("{repo}: no files")))
        }
    }
}

/// The name a model file is served under besides any `--served-as` names: its file stem (a
/// directory's name).
pub fn own_name(path: &Path) -> String {
    if path.is_dir() {
        if let Some(name) = path.file_name() {
            return name.to_string_lossy().into_owned();
        }
    }
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalog_maps_llama_3_8b() {
        let c = Catalog::builtin();
        let r = resolve("@cf/meta/llama-3-8b-instruct", &c).unwrap();
        assert_eq!(r.context_window, Some(7968));
        assert_eq!(
            r.catalog_name.as_deref(),
            Some("@cf/meta/llama-3-8b-instruct")
        );
        match r.source {
            ModelSource::Hub { repo, file, .. } => {
                assert!(file.ends_with(".gguf"), "{file}");
                assert!(file.contains("Q4_K_M"), "{file}");
                assert!(repo.contains('/'));
            }
            other => panic!("expected a hub source, got {other:?}"),
        }
    }

    #[test]
    fn hub_references_and_paths() {
        let c = Catalog::default();
        let r = resolve("hf:owner/repo/sub/dir/m.gguf", &c).unwrap();
        assert_eq!(
            r.source,
            ModelSource::Hub {
                repo: "owner/repo".into(),
                file: "sub/dir/m.gguf".into(),
                revision: "main".into()
            }
        );
        assert!(matches!(
            resolve("hf:owner", &c),
            Err(ModelSourceError::Unknown(_))
        ));
        let r = resolve("hf:BAAI/bge-small-en-v1.5", &c).unwrap();
        assert_eq!(r.task, ModelTask::TextEmbeddings);
        assert!(matches!(r.source, ModelSource::HubEncoder { .. }));
        let dir = std::env::temp_dir();
        assert_eq!(
            resolve(dir.to_str().unwrap(), &c).unwrap().task,
            ModelTask::TextEmbeddings
        );
        assert!(matches!(
            resolve("/nope/missing.gguf", &c),
            Err(ModelSourceError::Missing(_))
        ));
        assert!(matches!(
            resolve("@cf/unknown/model", &c),
            Err(ModelSourceError::Unknown(_))
        ));
    }

    #[test]
    fn offline_hub_miss_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("edgerun-hf-{}", std::process::id()));
        // SAFETY: this test is the only one in this binary touching these variables.
        unsafe {
            std::env::set_var("HF_HOME", &dir);
            std::env::set_var("HF_HUB_OFFLINE", "1");
        }
        let err = fetch(&ModelSource::Hub {
            repo: "owner/repo".into(),
            file: "m.gguf".into(),
            revision: "main".into(),
        })
        .unwrap_err();
        assert!(matches!(err, ModelSourceError::Offline { .. }), "{err}");
    }
}
