//! Counters: a key whose value is the decimal text of an `i64`, changed atomically on its
//! shard. An add can keep the counter within bounds (a fixed or sliding window for rate
//! limits comes from its TTL), and a counter is an ordinary key otherwise: it has revisions,
//! can be watched and compared in transactions.

use std::ops::RangeInclusive;
use std::time::Duration;

use tessera_protocol::codec::check_key;
use tessera_protocol::{CounterAdd, Request, Response};

use crate::{duration_ms, unexpected, Client, ClientError, PutOptions, PutOutcome, Result};

/// Options of a counter add beyond key and delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddOptions {
    min: Option<i64>,
    max: Option<i64>,
    create: bool,
    ttl: Option<Duration>,
    refresh_ttl: bool,
}

impl Default for AddOptions {
    fn default() -> Self {
        Self {
            min: None,
            max: None,
            create: true,
            ttl: None,
            refresh_ttl: false,
        }
    }
}

impl AddOptions {
    /// Create the counter at 0 if missing; no bounds, no TTL.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The counter may not go below `min`: an add that would fails with `OutOfRange` and
    /// applies nothing.
    #[must_use]
    pub fn min(mut self, min: i64) -> Self {
        self.min = Some(min);
        self
    }

    /// The counter may not go above `max`, likewise.
    #[must_use]
    pub fn max(mut self, max: i64) -> Self {
        self.max = Some(max);
        self
    }

    /// Both bounds at once.
    #[must_use]
    pub fn bounds(self, bounds: RangeInclusive<i64>) -> Self {
        let (min, max) = bounds.into_inner();
        self.min(min).max(max)
    }

    /// Do not create a missing counter: the add then applies nothing and says so
    /// ([`CounterOutcome::applied`]).
    #[must_use]
    pub fn no_create(mut self) -> Self {
        self.create = false;
        self
    }

    /// A counter this add creates expires after `ttl` (a fixed window: later adds keep the
    /// expiry, unless [`AddOptions::refresh_ttl`]).
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Restart the TTL on every add (a sliding window). Needs [`AddOptions::ttl`].
    #[must_use]
    pub fn refresh_ttl(mut self) -> Self {
        self.refresh_ttl = true;
        self
    }

    /// The wire form of an add of `delta` to `key` with these options.
    ///
    /// # Errors
    /// The TTL is out of range.
    pub fn to_request(&self, key: &[u8], delta: i64) -> Result<CounterAdd> {
        Ok(CounterAdd {
            key: key.to_vec(),
            delta,
            min: self.min,
            max: self.max,
            create: self.create,
            ttl_ms: self.ttl.map(duration_ms).transpose()?,
            refresh_ttl: self.refresh_ttl,
        })
    }
}

/// What a counter add did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterOutcome {
    /// Whether it applied: false only if the counter was missing and not created.
    pub applied: bool,
    /// The counter's value after the add (0 if not applied).
    pub value: i64,
    /// The key's mod revision after the add (0 if not applied).
    pub mod_revision: u64,
}

impl Client {
    /// Adds `delta` to the counter under `key` and returns the new value. A missing key
    /// counts as 0; the key's TTL is kept.
    ///
    /// # Errors
    /// `OutOfRange` if the result would overflow `i64` or the stored value is not a counter
    /// (nothing is applied); otherwise see [`ClientError`].
    pub async fn add(&self, key: impl AsRef<[u8]>, delta: i64) -> Result<i64> {
        Ok(self.add_with(key, delta, AddOptions::new()).await?.value)
    }

    /// Adds `delta` to the counter under `key` with bounds, a TTL window or without creating
    /// it.
    ///
    /// # Errors
    /// `OutOfRange` (nothing applied) if the result would leave the bounds or `i64`, or the
    /// stored value is not a counter; otherwise see [`ClientError`].
    pub async fn add_with(
        &self,
        key: impl AsRef<[u8]>,
        delta: i64,
        options: AddOptions,
    ) -> Result<CounterOutcome> {
        let key = key.as_ref();
        check_key(key)?;
        let request = Request::Add(Box::new(options.to_request(key, delta)?));
        tessera_protocol::codec::check_owned_request(&request)?;
        match self.call_for_key(key, &request).await? {
            Response::Counter {
                applied,
                value,
                mod_revision,
            } => Ok(CounterOutcome {
                applied,
                value,
                mod_revision,
            }),
            other => Err(unexpected(&other)),
        }
    }

    /// The counter under `key`, or `None` if the key does not exist.
    ///
    /// # Errors
    /// [`ClientError::NotACounter`] if the value is not the decimal text of an `i64`;
    /// otherwise see [`ClientError`].
    pub async fn counter(&self, key: impl AsRef<[u8]>) -> Result<Option<i64>> {
        let key = key.as_ref();
        self.get(key)
            .await?
            .map(|entry| parse_counter(key, &entry.value))
            .transpose()
    }

    /// Sets the counter under `key` to `value`, keeping its TTL (its window).
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn set_counter(&self, key: impl AsRef<[u8]>, value: i64) -> Result<PutOutcome> {
        self.put_with(key, value.to_string(), PutOptions::new().keep_ttl())
            .await
    }

    /// Sets the counter under `key` to `new` only if it is `current` now, keeping its TTL;
    /// `true` if it was set.
    ///
    /// One round trip when the counter is stored as the server writes it (plain decimal); a
    /// value written by hand in another form of the same number (`+7`, `007`) takes a second
    /// one, against those exact bytes.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn compare_and_set_counter(
        &self,
        key: impl AsRef<[u8]>,
        current: i64,
        new: i64,
    ) -> Result<bool> {
        let key = key.as_ref();
        let new = new.to_string();
        let options = PutOptions::new()
            .keep_ttl()
            .if_value(current.to_string())
            .return_previous();
        let outcome = self.put_with(key, &new, options).await?;
        if outcome.applied {
            return Ok(true);
        }
        match outcome.previous {
            Some(found) if parse_counter(key, &found.value).ok() == Some(current) => {
                let options = PutOptions::new().keep_ttl().if_value(found.value);
                Ok(self.put_with(key, &new, options).await?.applied)
            }
            _ => Ok(false),
        }
    }
}

/// A counter's value, parsed as the server writes it.
pub(crate) fn parse_counter(key: &[u8], value: &[u8]) -> Result<i64> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| ClientError::NotACounter {
            key: String::from_utf8_lossy(key).into_owned(),
            size: value.len(),
        })
}
