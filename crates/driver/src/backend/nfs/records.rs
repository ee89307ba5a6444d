//! One NFS export as the backend sees it: its connection pool and the index of its
//! volume records. A record lives at `<share>/.stowage/<volume name>`: a symbolic link
//! whose target is a small JSON text (capacity and placement). One SYMLINK call writes
//! it atomically — no torn records — and an existing one answers EXIST, which is then
//! verified by reading it back, never trusted. The records are read into memory on
//! first use and kept current by this process's creates and deletes, so looking a
//! name up before creating costs no round trip. Knows nothing of CSI.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::map_error;
use super::params::{Placement, RECORDS_DIR, WORK_DIR};
use crate::backend::BackendError;
use stowage_api::volume::ContentSource;
use stowage_nfs::client::{NfsClient, NfsError};

/// What a volume's record says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub capacity_bytes: u64,
    pub placement: Placement,
    /// What the volume was made from (a restore or a clone), if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<RecordedSource>,
}

/// A volume's content source as its record keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordedSource {
    Snapshot(String),
    Volume(String),
}

impl From<&ContentSource> for RecordedSource {
    fn from(source: &ContentSource) -> Self {
        match source {
            ContentSource::Snapshot(id) => RecordedSource::Snapshot(id.clone()),
            ContentSource::Volume(id) => RecordedSource::Volume(id.clone()),
        }
    }
}

impl From<&RecordedSource> for ContentSource {
    fn from(source: &RecordedSource) -> Self {
        match source {
            RecordedSource::Snapshot(id) => ContentSource::Snapshot(id.clone()),
            RecordedSource::Volume(id) => ContentSource::Volume(id.clone()),
        }
    }
}

impl Record {
    /// The record as its symlink's target text.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("a record is plain data and always serialises")
    }
}

/// Longest record a symlink target may hold (NFSv3 MAXPATHLEN).
const MAX_RECORD: usize = 1024;

/// An export: connection pool plus record index.
pub struct Export {
    pub client: NfsClient,
    index: tokio::sync::OnceCell<Mutex<HashMap<String, Record>>>,
}

impl Export {
    pub fn new(client: NfsClient) -> Self {
        Self {
            client,
            index: tokio::sync::OnceCell::new(),
        }
    }

    /// The index, read from `.stowage` the first time.
    async fn index(&self) -> Result<&Mutex<HashMap<String, Record>>, BackendError> {
        self.index
            .get_or_try_init(|| async {
                let names = self
                    .client
                    .read_dir(&[RECORDS_DIR])
                    .await
                    .map_err(map_error)?
                    .unwrap_or_default();
                let mut index = HashMap::with_capacity(names.len());
                for name in names {
                    if let Some(record) = self.read(&name).await? {
                        index.insert(name, record);
                    }
                }
                Ok(Mutex::new(index))
            })
            .await
    }

    /// The record of volume `name`, from the index.
    pub async fn lookup(&self, name: &str) -> Result<Option<Record>, BackendError> {
        let index = self.index().await?;
        Ok(index
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned())
    }

    /// Every record, sorted by name.
    pub async fn all(&self) -> Result<Vec<(String, Record)>, BackendError> {
        let index = self.index().await?;
        let mut all: Vec<(String, Record)> = index
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(all)
    }

    /// Read one record from the server.
    async fn read(&self, name: &str) -> Result<Option<Record>, BackendError> {
        let text = self
            .client
            .readlink(&[RECORDS_DIR, name])
            .await
            .map_err(map_error)?;
        Ok(text.and_then(|text| match serde_json::from_str(&text) {
            Ok(record) => Some(record),
            Err(e) => {
                tracing::warn!(name, error = %e, "ignoring an unreadable volume record");
                None
            }
        }))
    }

    /// Write the record of a new volume with one SYMLINK (making `.stowage` the first
    /// time). `Ok(Some(existing))` when a record was already there.
    pub async fn create(
        &self,
        name: &str,
        record: &Record,
    ) -> Result<Option<Record>, BackendError> {
        let index = self.index().await?;
        let text = record.encode();
        if text.len() > MAX_RECORD {
            return Err(BackendError::InvalidParameter(format!(
                "server, share and subDir of volume {name} are too long to record ({} bytes, at most {MAX_RECORD})",
                text.len()
            )));
        }
        let path = [RECORDS_DIR, name];
        let mut result = self.client.symlink(&path, &text).await;
        if let Err(NfsError::NotFound { .. }) = result {
            self.client
                .create_dir_all(&[RECORDS_DIR], 0o700, None)
                .await
                .map_err(map_error)?;
            result = self.client.symlink(&path, &text).await;
        }
        let existing = match result {
            Ok(()) => None,
            Err(NfsError::AlreadyExists { .. }) => match self.read(name).await? {
                Some(existing) => Some(existing),
                None => {
                    return Err(BackendError::Internal(format!(
                        "{RECORDS_DIR}/{name} exists on the export but is not a stowage record; remove it"
                    )));
                }
            },
            Err(e) => return Err(map_error(e)),
        };
        let stored = existing.clone().unwrap_or_else(|| record.clone());
        index
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned(), stored);
        Ok(existing)
    }

    /// Rewrite the record of volume `name` (a grown capacity): the new text is written
    /// beside it under `.stowage-work` and renamed over it, so the record is always
    /// the old one or the new one, never missing.
    pub async fn update(&self, name: &str, record: &Record) -> Result<(), BackendError> {
        let index = self.index().await?;
        let text = record.encode();
        let scratch_name = format!("record-{name}");
        let scratch = [WORK_DIR, scratch_name.as_str()];
        self.client.remove_file(&scratch).await.map_err(map_error)?;
        self.client
            .create_dir_all(&[WORK_DIR], 0o700, None)
            .await
            .map_err(map_error)?;
        self.client
            .symlink(&scratch, &text)
            .await
            .map_err(map_error)?;
        self.client
            .replace(&scratch, &[RECORDS_DIR, name])
            .await
            .map_err(map_error)?;
        index
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned(), record.clone());
        Ok(())
    }

    /// Remove the record of volume `name` (absent is fine).
    pub async fn remove(&self, name: &str) -> Result<(), BackendError> {
        let index = self.index().await?;
        self.client
            .remove_file(&[RECORDS_DIR, name])
            .await
            .map_err(map_error)?;
        index.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
        Ok(())
    }
}
