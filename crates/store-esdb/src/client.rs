//! The adapter proper: [`EsdbEventStore`], the [`EventStore`] port over the
//! official `eventstore` gRPC client (4.x).
//!
//! This is the only module that names the `eventstore` crate: moving to its
//! renamed successor `kurrentdb` is a change to this file alone.
//!
//! # Streams
//!
//! The tracker's stream `s` is the server's stream `{prefix}s`
//! ([`EsdbOptions::stream_prefix`]); reads strip the prefix again. Every
//! `$all` read and subscription of this adapter carries a server-side filter
//! on that prefix, so it sees this tracker's events and nothing else (other
//! applications, system streams, other trackers or test runs with another
//! prefix). Prefixes of two trackers sharing a server must not be prefixes
//! of one another.
//!
//! # Positions
//!
//! The port promises gap-free positions from 1; `$all`'s commit/prepare
//! positions are byte offsets with gaps. The position of an event is
//! therefore its ordinal (1-based) among this tracker's events in `$all`
//! order. `$all` order is global, so every process derives the same
//! ordinals. Each [`EsdbEventStore`] keeps the ordinal -> `$all` position
//! index in memory (16 bytes an event), built by one background catch-up
//! subscription to the filtered `$all` that then follows new events live.
//!
//! **Start-up cost**: after [`EsdbEventStore::connect`] that subscription
//! reads every event of this tracker once (the server scans `$all` and sends
//! only the matching events, whole: gRPC has no "positions only" read).
//! Until it has caught up, calls that need a position (appends, reads)
//! wait for it, up to [`EsdbOptions::index_timeout`], and then fail with
//! [`StoreError::Storage`] (503, retried by the sender).
//!
//! # Appends and duplicates
//!
//! EventStoreDB deduplicates event ids only when the expected revision is
//! checked, and for `Any` only through a bounded in-memory cache. So an
//! append reads the target stream first (learner streams are short; the
//! adapter remembers the ids, revisions and positions of recently appended
//! streams, so the next append reads only what was added since), finds
//! the ids already there (a redelivery, however late, gets the original
//! records back), checks the caller's expectation against what it read, and
//! then writes with the EXACT revision it read (or "no stream"). A
//! wrong-expected-version answer (the client's typed error) means another
//! process wrote in between: read again and decide again, a bounded number
//! of times. Appends to one stream from one process are serialised (striped
//! locks), so only writers in other processes ever race.
//!
//! The server answers an exact-revision append of ids that a racer has just
//! written at those revisions with success (its own idempotency) without
//! writing anything. To tell that apart from our own write, each append
//! stamps its events' metadata with a fresh `append_id` and reads the
//! written revisions back: someone else's `append_id` means the events are
//! duplicates.
//!
//! An append therefore costs three calls (read what is new, append, read
//! the written revisions back) plus the wait for the index subscription to
//! deliver it. Note that the `eventstore` 4.0 client does not set
//! `TCP_NODELAY`: with a receiver that delays ACKs (Linux does), each call
//! can take ~40 ms longer than it should (measured against the test server
//! before it turned delayed ACKs off). Measure against the real server.
//!
//! **Known limit**: [`AppendError::IdInOtherStream`] is checked only within
//! the target stream on EventStoreDB. A global check would need an id index
//! over the whole log, and could still not be made atomic across processes.
//! The tracker derives ids from the same keys that name the stream, so an id
//! cannot honestly occur in two streams; the embedded store still checks it.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, DefaultHasher, Hash, Hasher};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use eventstore::{
    AppendToStreamOptions, Client, ClientSettings, Error as EsError, EventData,
    ExpectedRevision as EsExpected, Position as EsPosition, ReadAllOptions, ReadStreamOptions,
    RecordedEvent as EsRecorded, StreamPosition, SubscribeToAllOptions, Subscription as EsSub,
    SubscriptionEvent, SubscriptionFilter,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex as AsyncMutex, watch};
use tracker_store::{
    AppendError, AppendOutcome, AppendedEvent, EventMetadata, EventStore, ExpectedRevision,
    NewEvent, Position, ReadAll, RecordedEvent, StoreError, StreamRevision, Subscription,
};
use uuid::Uuid;

/// Streams whose events appends remember (see [`Inner::known`]); past
/// this the memory is simply dropped and rebuilt by the next reads.
const KNOWN_STREAMS: usize = 4_096;

/// One event of a stream, as appends need it.
#[derive(Debug, Clone, Copy)]
struct Known {
    id: Uuid,
    revision: u64,
    position: EsPosition,
}

impl Known {
    fn of(event: &EsRecorded) -> Self {
        Self {
            id: event.id,
            revision: event.revision,
            position: event.position,
        }
    }
}

/// A stream's known events, taken out of the cache while an append holds
/// the stream's lock, and put back however the append ends.
struct KnownStream<'a> {
    inner: &'a Inner,
    name: String,
    events: Vec<Known>,
}

impl<'a> KnownStream<'a> {
    fn take(inner: &'a Inner, name: &str) -> Self {
        let events = inner
            .known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name)
            .unwrap_or_default();
        Self {
            inner,
            name: name.to_owned(),
            events,
        }
    }

    /// The revision to read from next.
    fn next_revision(&self) -> u64 {
        next_revision(&self.events)
    }

    fn extend(&mut self, read: &[EsRecorded]) -> bool {
        extend_known(&mut self.events, read)
    }
}

fn next_revision(events: &[Known]) -> u64 {
    events.last().map_or(0, |e| e.revision + 1)
}

/// Adds events read from the server from the next revision on; false if
/// they do not continue the known ones (the stream was deleted or truncated
/// on the server), in which case all is forgotten and the stream must be
/// read again from its start.
fn extend_known(events: &mut Vec<Known>, read: &[EsRecorded]) -> bool {
    for event in read {
        let next = next_revision(events);
        if event.revision < next {
            continue;
        }
        if event.revision > next && !events.is_empty() {
            events.clear();
            return false;
        }
        events.push(Known::of(event));
    }
    true
}

impl Drop for KnownStream<'_> {
    fn drop(&mut self) {
        let mut known = self
            .inner
            .known
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if known.len() >= KNOWN_STREAMS {
            known.clear();
        }
        known.insert(
            std::mem::take(&mut self.name),
            std::mem::take(&mut self.events),
        );
    }
}

/// Stripes of the per-stream append lock: appends to one stream from this
/// process take turns; different learners rarely share a stripe.
const APPEND_STRIPES: usize = 256;

/// Fewest `$all` events `head` reads backwards before it waits for the
/// index instead (see [`EsdbEventStore::head`]); at least four checkpoint
/// intervals, so that the index reports a checkpoint past the oldest.
const HEAD_SCAN: usize = 512;

/// Events per call when a stream is read (see `read_stream_raw`).
const STREAM_PAGE: usize = 1_024;

/// Tunables of [`EsdbEventStore::connect`].
#[derive(Debug, Clone)]
pub struct EsdbOptions {
    /// Prepended to every stream this adapter writes; the server-side `$all`
    /// filter selects on it. Default `"tracker-"`.
    pub stream_prefix: String,
    /// Deadline of one call to the server (an append, a stream read, one
    /// step of a `$all` read). Default 10 s.
    pub operation_timeout: Duration,
    /// How long a call waits for the position index to reach the events it
    /// needs (it lags the server only while catching up at start-up or
    /// after a dropped connection). Default 30 s.
    pub index_timeout: Duration,
    /// The server-side filter's search window: the server reports a
    /// checkpoint after scanning this many events that do not match, so
    /// that a subscription knows how far it got even when nothing matched.
    /// Default 32.
    pub checkpoint_interval: u32,
    /// How many times an append re-reads and retries after another process
    /// wrote to the same stream in between. Default 20.
    pub max_append_attempts: u32,
    /// Longest wait between two attempts to resubscribe after a dropped
    /// connection (the wait doubles from 50 ms up to this). Default 2 s.
    pub max_resubscribe_backoff: Duration,
}

impl Default for EsdbOptions {
    fn default() -> Self {
        Self {
            stream_prefix: "tracker-".to_owned(),
            operation_timeout: Duration::from_secs(10),
            index_timeout: Duration::from_secs(30),
            checkpoint_interval: 32,
            max_append_attempts: 20,
            max_resubscribe_backoff: Duration::from_secs(2),
        }
    }
}

impl EsdbOptions {
    /// The defaults with another stream prefix.
    pub fn with_prefix(prefix: impl Into<String>) -> Self {
        Self {
            stream_prefix: prefix.into(),
            ..Self::default()
        }
    }
}

/// What this adapter stores in an event's custom metadata (JSON).
#[derive(Debug, Serialize, Deserialize)]
struct StoredMetadata {
    received_at: DateTime<Utc>,
    source_id: String,
    request_id: String,
    content_hash: String,
    schema_version: u32,
    /// The append call that wrote the event: tells our own write apart from
    /// the server's idempotent "success" for a racer's identical write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    append_id: Option<Uuid>,
}

/// The [`EventStore`] on EventStoreDB / KurrentDB. Cheap to clone: clones
/// share one connection, one position index and one index subscription.
/// Dropping the last clone (or [`close`](Self::close)) stops the index
/// subscription and ends live subscriptions.
#[derive(Clone)]
pub struct EsdbEventStore {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    stripes: Box<[AsyncMutex<()>]>,
    /// What appends have learnt of recently written streams (ids, revisions,
    /// positions: immutable once written), so that the next append to the
    /// stream reads only what was added since. Only touched under the
    /// stream's stripe lock.
    known: std::sync::Mutex<HashMap<String, Vec<Known>>>,
    shutdown: watch::Sender<bool>,
    indexer: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// What the index task and live subscriptions need; they hold this, not
/// [`Inner`], so that they do not keep the store alive.
struct Shared {
    conn: Connection,
    index: Index,
    prefix: String,
    options: EsdbOptions,
}

impl EsdbEventStore {
    /// Connects to `url` (`esdb://host:2113?tls=false`,
    /// `esdb://user:pass@host:2113`, `esdb+discover://cluster-dns:2113`;
    /// TLS is on unless the url says `tls=false`), checks that the server
    /// answers (one read of the end of `$all`, so a wrong address or
    /// credentials fail here rather than at the first webhook) and starts
    /// the index subscription. Must be called inside a tokio runtime.
    pub async fn connect(url: &str, options: EsdbOptions) -> Result<Self, StoreError> {
        if options.stream_prefix.is_empty() || options.stream_prefix.starts_with('$') {
            return Err(StoreError::Storage(
                "event_store.stream_prefix must be non-empty and must not start with '$' \
                 (system streams)"
                    .into(),
            ));
        }
        let settings: ClientSettings = url.parse().map_err(|err: eventstore::ClientSettingsParseError| {
            // The parse error may quote the whole url, password included.
            let reason = err
                .error()
                .map_or_else(|| err.message().to_owned(), ToString::to_string);
            StoreError::Storage(format!(
                "event_store.url is not a valid esdb:// or esdb+discover:// connection string: {reason}"
            ))
        })?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            StoreError::Storage("EsdbEventStore::connect must run inside a tokio runtime".into())
        })?;
        let shared = Arc::new(Shared {
            conn: Connection::new(settings, runtime.clone())?,
            index: Index::new(),
            prefix: options.stream_prefix.clone(),
            options,
        });
        shared.end_of_all(false).await?;

        let (shutdown, _) = watch::channel(false);
        let indexer = runtime.spawn(run_indexer(Arc::clone(&shared), shutdown.subscribe()));
        Ok(Self {
            inner: Arc::new(Inner {
                shared,
                stripes: (0..APPEND_STRIPES).map(|_| AsyncMutex::new(())).collect(),
                known: std::sync::Mutex::new(HashMap::new()),
                shutdown,
                indexer: std::sync::Mutex::new(Some(indexer)),
            }),
        })
    }

    /// The server-side name of the tracker's stream `stream`.
    pub fn server_stream_name(&self, stream: &str) -> String {
        self.inner.shared.server_name(stream)
    }

    /// Stops the index subscription; later calls return
    /// [`StoreError::Closed`] and live subscriptions end. Appends already
    /// acknowledged are durable on the server: there is nothing to flush.
    pub fn close(&self) {
        self.inner.close();
    }

    fn check_open(&self) -> Result<(), StoreError> {
        if *self.inner.shutdown.borrow() {
            Err(StoreError::Closed)
        } else {
            Ok(())
        }
    }

    fn stripe(&self, stream: &str) -> &AsyncMutex<()> {
        let mut hasher = DefaultHasher::new();
        stream.hash(&mut hasher);
        let slot = (hasher.finish() % self.inner.stripes.len() as u64) as usize;
        &self.inner.stripes[slot]
    }

    /// Answers a request whose ids are all recorded in the stream already.
    async fn duplicates(
        &self,
        events: &[NewEvent],
        recorded: &HashMap<Uuid, Known>,
        current: u64,
    ) -> Result<AppendOutcome, AppendError> {
        let mut originals = Vec::with_capacity(events.len());
        for event in events {
            let original = recorded.get(&event.id).ok_or_else(|| {
                StoreError::Storage(format!("event {} vanished from its stream", event.id))
            })?;
            originals.push((event.id, original.revision, original.position));
        }
        let positions: Vec<EsPosition> = originals.iter().map(|o| o.2).collect();
        let ordinals = self
            .inner
            .shared
            .index
            .ordinals_of(&positions, &self.inner.shared.options)
            .await?;
        Ok(AppendOutcome {
            next_revision: current,
            events: originals
                .into_iter()
                .zip(ordinals)
                .map(|((id, revision, _), position)| AppendedEvent {
                    id,
                    revision,
                    position,
                    duplicate: true,
                })
                .collect(),
        })
    }

    /// After the server accepted a write of `events` ending at
    /// `last_revision`: reads the written revisions back to tell our write
    /// from an idempotent answer to a racer's, and maps them to ordinals.
    async fn written(
        &self,
        name: &str,
        events: &[NewEvent],
        last_revision: u64,
        append_id: Uuid,
        known: &mut KnownStream<'_>,
    ) -> Result<AppendOutcome, AppendError> {
        let shared = &self.inner.shared;
        let count = events.len() as u64;
        let first = (last_revision + 1).checked_sub(count).ok_or_else(|| {
            StoreError::Storage(format!(
                "the server reported revision {last_revision} after appending {count} events to {name}"
            ))
        })?;
        let back = shared.read_stream_raw(name, first, usize::MAX).await?;
        if back.len() < events.len()
            || back
                .iter()
                .zip(events)
                .any(|(stored, sent)| stored.id != sent.id)
        {
            return Err(StoreError::Storage(format!(
                "{name}: the server acknowledged the append at revisions {first}..={last_revision} \
                 but they hold other events"
            ))
            .into());
        }
        known.extend(&back);
        let written = &back[..events.len()];
        let ours = written
            .iter()
            .all(|e| stored_metadata(e).is_ok_and(|m| m.append_id == Some(append_id)));
        let positions: Vec<EsPosition> = written.iter().map(|e| e.position).collect();
        let ordinals = shared
            .index
            .ordinals_of(&positions, &shared.options)
            .await?;
        let current = back.last().map_or(last_revision, |e| e.revision);
        Ok(AppendOutcome {
            next_revision: if ours { last_revision } else { current },
            events: written
                .iter()
                .zip(ordinals)
                .map(|(e, position)| AppendedEvent {
                    id: e.id,
                    revision: e.revision,
                    position,
                    duplicate: !ours,
                })
                .collect(),
        })
    }
}

impl Inner {
    fn close(&self) {
        self.shutdown.send_replace(true);
        self.shared.index.close();
        let mut indexer = self.indexer.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(task) = indexer.take() {
            task.abort();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.close();
    }
}

impl fmt::Debug for EsdbEventStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let progress = *self.inner.shared.index.progress.borrow();
        f.debug_struct("EsdbEventStore")
            .field("stream_prefix", &self.inner.shared.prefix)
            .field("indexed", &progress.len)
            .field("caught_up", &progress.caught_up)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl EventStore for EsdbEventStore {
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedRevision,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome, AppendError> {
        tracker_store::check_request(&events)?;
        self.check_open()?;
        let shared = &self.inner.shared;
        let name = shared.server_name(stream);
        let _turn = self.stripe(stream).lock().await;

        let mut known = KnownStream::take(&self.inner, &name);
        let mut attempt = 0;
        loop {
            attempt += 1;
            // Only what was added since the last append from here (all of
            // it the first time).
            let added = shared
                .read_stream_raw(&name, known.next_revision(), usize::MAX)
                .await?;
            if !known.extend(&added) {
                continue;
            }
            let current: StreamRevision = known.events.last().map(|e| e.revision);
            let by_id: HashMap<Uuid, Known> = known.events.iter().map(|e| (e.id, *e)).collect();
            let recorded = events.iter().filter(|e| by_id.contains_key(&e.id)).count();
            if recorded == events.len() {
                return self
                    .duplicates(&events, &by_id, current.unwrap_or_default())
                    .await;
            }
            if let Some(first) = events.iter().find(|e| by_id.contains_key(&e.id)) {
                return Err(AppendError::PartialDuplicate { id: first.id });
            }
            let accepted = match expected {
                ExpectedRevision::Any => true,
                ExpectedRevision::NoStream => current.is_none(),
                ExpectedRevision::StreamExists => current.is_some(),
                ExpectedRevision::Exact(revision) => current == Some(revision),
            };
            if !accepted {
                return Err(AppendError::Conflict {
                    stream: stream.to_owned(),
                    expected,
                    actual: current,
                });
            }

            let append_id = Uuid::new_v4();
            let data = events
                .iter()
                .map(|e| encode(e, append_id))
                .collect::<Result<Vec<_>, _>>()?;
            let exact = current.map_or(EsExpected::NoStream, EsExpected::Exact);
            match shared.append_raw(&name, exact, data).await {
                Ok(last_revision) => {
                    return self
                        .written(&name, &events, last_revision, append_id, &mut known)
                        .await;
                }
                // Another process wrote to the stream since our read (typed
                // error, not text): read again and decide again.
                Err(Raced::Conflict) if attempt < shared.options.max_append_attempts => {
                    tracing::debug!(stream, attempt, "concurrent write to the stream; retrying");
                    tokio::time::sleep(jitter(attempt)).await;
                }
                Err(Raced::Conflict) => {
                    return Err(StoreError::Storage(format!(
                        "stream {stream} kept changing under concurrent writers: gave up after \
                         {attempt} attempts"
                    ))
                    .into());
                }
                // The client has already switched to the leader it named.
                Err(Raced::NotLeader) if attempt < shared.options.max_append_attempts => {}
                Err(Raced::NotLeader) => {
                    return Err(
                        StoreError::Storage("no leader node accepted the append".into()).into(),
                    );
                }
                Err(Raced::Store(err)) => return Err(err.into()),
            }
        }
    }

    async fn read_stream(
        &self,
        stream: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.check_open()?;
        let shared = &self.inner.shared;
        let raw = shared
            .read_stream_raw(&shared.server_name(stream), from, limit)
            .await?;
        let positions: Vec<EsPosition> = raw.iter().map(|e| e.position).collect();
        let ordinals = shared
            .index
            .ordinals_of(&positions, &shared.options)
            .await?;
        raw.iter()
            .zip(ordinals)
            .map(|(e, ordinal)| shared.decode(e, ordinal))
            .collect()
    }

    async fn read_all(&self, read: ReadAll) -> Result<Vec<RecordedEvent>, StoreError> {
        self.check_open()?;
        if read.limit == 0 {
            return Ok(Vec::new());
        }
        let shared = &self.inner.shared;
        let from = read.from.max(1);
        let wanted_to = from.saturating_add(read.limit as u64 - 1);
        let mut len = shared.index.len();
        if wanted_to > len {
            // The index may lag what other processes wrote: catch up first.
            len = self.head().await?;
        }
        if from > len {
            return Ok(Vec::new());
        }
        let to = wanted_to.min(len);
        let (after, expected) = shared.index.range(from, to)?;
        let raw = shared.read_all_raw(after, &expected).await?;
        raw.iter()
            .zip(from..)
            .map(|(e, ordinal)| shared.decode(e, ordinal))
            .collect()
    }

    /// The index length once the index has seen the last event of this
    /// tracker on the server. Finding that event: read `$all` backwards
    /// from its end until one of this tracker's events (wait for the index
    /// to reach it), or a position the index has already scanned past
    /// (nothing new), or a few hundred events of other streams (wait for the
    /// index to scan past them, which its filter checkpoints report).
    async fn head(&self) -> Result<Position, StoreError> {
        self.check_open()?;
        let shared = &self.inner.shared;
        let progress = shared.index.progress();
        let tail = shared.tail_scan(&progress).await?;
        let target = match tail {
            Tail::Known => return Ok(shared.index.len()),
            Tail::Ours(position) | Tail::Foreign(position) => position,
        };
        let progress = shared
            .index
            .wait(&shared.options, "reach the end of $all", |p| {
                p.covers(target)
            })
            .await?;
        Ok(progress.len)
    }

    fn subscribe_all(&self, from: Position) -> Subscription {
        let follower = Follower {
            shared: Arc::clone(&self.inner.shared),
            shutdown: self.inner.shutdown.subscribe(),
            next: from.max(1),
            resume: None,
            checkpoint: None,
            started: false,
            sub: None,
            backoff: Backoff::new(self.inner.shared.options.max_resubscribe_backoff),
            gaps: 0,
            done: false,
        };
        Box::pin(futures::stream::unfold(
            follower,
            |mut follower| async move {
                let item = follower.next_item().await?;
                Some((item, follower))
            },
        ))
    }

    /// One read of the end of `$all` on the leader: the server is reachable,
    /// we are authorised, and a leader exists. Writes nothing.
    async fn writable(&self) -> Result<(), StoreError> {
        self.check_open()?;
        self.inner.shared.end_of_all(true).await.map(|_| ())
    }
}

/// Why a raw append did not write.
enum Raced {
    /// Wrong expected version: someone else wrote to the stream.
    Conflict,
    NotLeader,
    Store(StoreError),
}

/// What reading the end of `$all` backwards found.
enum Tail {
    /// Nothing after what the index has scanned belongs to this tracker.
    Known,
    /// This tracker's last event is at this position.
    Ours(EsPosition),
    /// Only other streams' events down to this position.
    Foreign(EsPosition),
}

impl Shared {
    fn server_name(&self, stream: &str) -> String {
        format!("{}{stream}", self.prefix)
    }

    fn filter(&self) -> SubscriptionFilter {
        SubscriptionFilter::on_stream_name()
            .add_prefix(&self.prefix)
            .max(self.options.checkpoint_interval.max(1))
    }

    /// Every event of one server stream from revision `from`, at most
    /// `limit`; a missing stream reads as empty. Read in pages of
    /// [`STREAM_PAGE`], each call under its own deadline: an append's first
    /// read of a long stream (an institution's, growing for years) must not
    /// be one call that can never finish in time.
    async fn read_stream_raw(
        &self,
        name: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<EsRecorded>, StoreError> {
        let mut events = Vec::new();
        let mut from = from;
        while events.len() < limit {
            let want = (limit - events.len()).min(STREAM_PAGE);
            let page = self.read_stream_page(name, from, want).await?;
            let short = page.len() < want;
            if let Some(last) = page.last() {
                from = last.revision.saturating_add(1);
            }
            events.extend(page);
            if short {
                break;
            }
        }
        Ok(events)
    }

    /// One call of [`Self::read_stream_raw`].
    async fn read_stream_page(
        &self,
        name: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<EsRecorded>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // On the leader whatever the connection's node preference: an
        // append decides duplicates and revision conflicts on this read,
        // and a follower behind it would turn a client's own last write
        // into a conflict.
        let options = ReadStreamOptions::default()
            .forwards()
            .position(StreamPosition::Position(from))
            .max_count(limit)
            .requires_leader(true)
            .deadline(self.options.operation_timeout);
        let slot = self.conn.get();
        let mut read = match slot.client.read_stream(name, &options).await {
            Ok(read) => read,
            Err(EsError::ResourceNotFound) => return Ok(Vec::new()),
            Err(err) => return Err(self.conn.failed(slot.generation, "reading a stream", &err)),
        };
        let mut events = Vec::new();
        loop {
            match read.next().await {
                Ok(Some(resolved)) => {
                    if let Some(event) = resolved.event {
                        events.push(event);
                    }
                }
                Ok(None) => return Ok(events),
                Err(EsError::ResourceNotFound) => return Ok(Vec::new()),
                Err(err) => {
                    return Err(self.conn.failed(slot.generation, "reading a stream", &err));
                }
            }
        }
    }

    /// Appends with an exact expectation; the last revision written.
    async fn append_raw(
        &self,
        name: &str,
        expected: EsExpected,
        events: Vec<EventData>,
    ) -> Result<u64, Raced> {
        let options = AppendToStreamOptions::default()
            .expected_revision(expected)
            .deadline(self.options.operation_timeout);
        let slot = self.conn.get();
        match slot.client.append_to_stream(name, &options, events).await {
            Ok(result) => Ok(result.next_expected_version),
            Err(EsError::WrongExpectedVersion { .. }) => Err(Raced::Conflict),
            Err(err @ EsError::NotLeaderException(_)) => {
                tracing::info!(error = %err, "append reached a follower; the client switches to the leader");
                Err(Raced::NotLeader)
            }
            Err(err) => Err(Raced::Store(self.conn.failed(
                slot.generation,
                "appending",
                &err,
            ))),
        }
    }

    /// The events at `expected` positions, read through the filtered `$all`
    /// from just after `after`.
    async fn read_all_raw(
        &self,
        after: Option<EsPosition>,
        expected: &[EsPosition],
    ) -> Result<Vec<EsRecorded>, StoreError> {
        let start = after.map_or(StreamPosition::Start, StreamPosition::Position);
        let options = SubscribeToAllOptions::default()
            .position(start)
            .filter(self.filter());
        let slot = self.conn.get();
        let mut sub = slot.client.subscribe_to_all(&options).await;
        let mut events = Vec::with_capacity(expected.len());
        while events.len() < expected.len() {
            let next = tokio::time::timeout(
                self.options.operation_timeout,
                sub.next_subscription_event(),
            )
            .await
            .map_err(|_| {
                StoreError::Storage(format!(
                    "reading $all: no answer within {:?}",
                    self.options.operation_timeout
                ))
            })?;
            match next {
                Ok(SubscriptionEvent::EventAppeared(resolved)) => {
                    let Some(event) = resolved.event else {
                        continue;
                    };
                    if after.is_some_and(|a| event.position <= a) {
                        continue;
                    }
                    let want = expected[events.len()];
                    if event.position != want {
                        return Err(StoreError::Storage(format!(
                            "$all holds {} where the position index expects {want}: the index \
                             is inconsistent with the server",
                            event.position
                        )));
                    }
                    events.push(event);
                }
                Ok(_) => {}
                Err(err) => return Err(self.conn.failed(slot.generation, "reading $all", &err)),
            }
        }
        Ok(events)
    }

    /// Reads the last event of `$all` (on the leader if `leader`): the
    /// cheapest call that proves the server answers.
    async fn end_of_all(&self, leader: bool) -> Result<Option<EsPosition>, StoreError> {
        let options = ReadAllOptions::default()
            .position(StreamPosition::End)
            .max_count(1)
            .requires_leader(leader)
            .deadline(self.options.operation_timeout);
        let slot = self.conn.get();
        let what = "reading the end of $all";
        let mut read = match slot.client.read_all(&options).await {
            Ok(read) => read,
            Err(err) => return Err(self.conn.failed(slot.generation, what, &err)),
        };
        let mut last = None;
        loop {
            match read.next().await {
                Ok(Some(resolved)) => {
                    if let Some(event) = resolved.event {
                        last = last.max(Some(event.position));
                    }
                }
                Ok(None) => return Ok(last),
                Err(err) => return Err(self.conn.failed(slot.generation, what, &err)),
            }
        }
    }

    /// Reads `$all` backwards from its end; see [`EsdbEventStore::head`].
    async fn tail_scan(&self, progress: &Progress) -> Result<Tail, StoreError> {
        let limit = HEAD_SCAN.max(4 * self.options.checkpoint_interval as usize);
        let options = ReadAllOptions::default()
            .position(StreamPosition::End)
            .max_count(limit)
            .deadline(self.options.operation_timeout);
        let slot = self.conn.get();
        let what = "reading the end of $all";
        let mut read = match slot.client.read_all(&options).await {
            Ok(read) => read,
            Err(err) => return Err(self.conn.failed(slot.generation, what, &err)),
        };
        let mut examined = 0;
        let mut oldest = None;
        loop {
            match read.next().await {
                Ok(Some(resolved)) => {
                    let Some(event) = resolved.event else {
                        continue;
                    };
                    examined += 1;
                    if progress.covers(event.position) {
                        return Ok(Tail::Known);
                    }
                    if event.stream_id.starts_with(&self.prefix) {
                        return Ok(Tail::Ours(event.position));
                    }
                    oldest = Some(event.position);
                }
                // The beginning of `$all` (nothing of ours at all), or
                // `limit` events of other streams.
                Ok(None) => {
                    return Ok(match oldest {
                        Some(position) if examined >= limit => Tail::Foreign(position),
                        _ => Tail::Known,
                    });
                }
                Err(err) => return Err(self.conn.failed(slot.generation, what, &err)),
            }
        }
    }

    fn decode(&self, event: &EsRecorded, position: Position) -> Result<RecordedEvent, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt { position, reason };
        let stream = event.stream_id.strip_prefix(&self.prefix).ok_or_else(|| {
            corrupt(format!(
                "stream {} lacks the prefix {}",
                event.stream_id, self.prefix
            ))
        })?;
        let data = std::str::from_utf8(&event.data)
            .map_err(|err| corrupt(format!("data is not UTF-8: {err}")))?;
        let metadata = stored_metadata(event).map_err(|err| corrupt(format!("metadata: {err}")))?;
        Ok(RecordedEvent {
            id: event.id,
            stream: stream.to_owned(),
            revision: event.revision,
            position,
            event_type: event.event_type.clone(),
            schema_version: metadata.schema_version,
            data: data.to_owned(),
            metadata: EventMetadata {
                received_at: metadata.received_at,
                source_id: metadata.source_id,
                request_id: metadata.request_id,
                content_hash: metadata.content_hash,
            },
        })
    }
}

fn stored_metadata(event: &EsRecorded) -> Result<StoredMetadata, serde_json::Error> {
    serde_json::from_slice(&event.custom_metadata)
}

/// The server event for `event`. Data goes as is: content type JSON when the
/// text is exactly one JSON value (what the tracker writes), otherwise (say,
/// surrounding white space, which a JSON value cannot carry) as bytes, so
/// that every byte comes back.
fn encode(event: &NewEvent, append_id: Uuid) -> Result<EventData, StoreError> {
    let metadata = StoredMetadata {
        received_at: event.metadata.received_at,
        source_id: event.metadata.source_id.clone(),
        request_id: event.metadata.request_id.clone(),
        content_hash: event.metadata.content_hash.clone(),
        schema_version: event.schema_version,
        append_id: Some(append_id),
    };
    let metadata = serde_json::to_vec(&metadata)
        .map_err(|err| StoreError::Storage(format!("encoding event metadata: {err}")))?;
    let verbatim = serde_json::value::RawValue::from_string(event.data.clone())
        .ok()
        .filter(|raw| raw.get() == event.data);
    let data = match verbatim {
        Some(raw) => EventData::json(&event.event_type, &raw)
            .map_err(|err| StoreError::Storage(format!("encoding event data: {err}")))?,
        None => EventData::binary(
            &event.event_type,
            Bytes::from(event.data.clone().into_bytes()),
        ),
    };
    Ok(data.id(event.id).metadata(Bytes::from(metadata)))
}

/// A short random pause before retrying a raced append, growing with the
/// attempt, so that racing processes do not retry in lockstep.
fn jitter(attempt: u32) -> Duration {
    let random = RandomState::new().hash_one(attempt);
    Duration::from_micros(random % (2_000 * u64::from(attempt.min(10))) + 200)
}

/// The client and how to replace it. The `eventstore` client stops for good
/// when its first connection attempt fails (every later call answers
/// "connection closed"), so a failed call of that kind replaces it.
struct Connection {
    settings: ClientSettings,
    runtime: tokio::runtime::Handle,
    current: RwLock<Slot>,
}

#[derive(Clone)]
struct Slot {
    generation: u64,
    client: Client,
}

impl Connection {
    fn new(settings: ClientSettings, runtime: tokio::runtime::Handle) -> Result<Self, StoreError> {
        let client =
            Client::with_runtime_handle(runtime.clone(), settings.clone()).map_err(|err| {
                StoreError::Storage(format!("creating the EventStoreDB client: {err}"))
            })?;
        Ok(Self {
            settings,
            runtime,
            current: RwLock::new(Slot {
                generation: 0,
                client,
            }),
        })
    }

    fn get(&self) -> Slot {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Maps a failed call to a [`StoreError`], replacing the client first
    /// if the failure means it has stopped.
    fn failed(&self, generation: u64, what: &str, err: &EsError) -> StoreError {
        if matches!(
            err,
            EsError::ConnectionClosed | EsError::GrpcConnectionError(_)
        ) {
            let mut slot = self.current.write().unwrap_or_else(PoisonError::into_inner);
            if slot.generation == generation {
                match Client::with_runtime_handle(self.runtime.clone(), self.settings.clone()) {
                    Ok(client) => {
                        *slot = Slot {
                            generation: generation + 1,
                            client,
                        };
                    }
                    Err(err) => {
                        tracing::error!(error = %err, "cannot recreate the EventStoreDB client")
                    }
                }
            }
        }
        StoreError::Storage(format!("EventStoreDB, {what}: {err}"))
    }
}

/// The ordinal -> `$all` position index.
struct Index {
    /// `positions[i]` is the `$all` position of the event at ordinal `i + 1`.
    positions: RwLock<Vec<EsPosition>>,
    progress: watch::Sender<Progress>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    /// Events indexed (= the highest ordinal known).
    len: u64,
    /// The last event indexed.
    last_event: Option<EsPosition>,
    /// The furthest filter checkpoint. Some KurrentDB builds (before the
    /// KDB-744 fix, kurrent-io/KurrentDB#4970) sent one at the end of the
    /// log, the position the next write then takes: a checkpoint vouches
    /// only for what lies strictly before it, until the server sends
    /// something after it.
    checkpoint: Option<EsPosition>,
    /// Where the index resubscribes after a drop: the last event indexed or
    /// the checkpoint before the latest one, whichever is further (the
    /// latest may be such an end-of-log checkpoint, and resuming after it
    /// would lose the event written there).
    resume_after: Option<EsPosition>,
    /// The index subscription went live at least once.
    caught_up: bool,
    closed: bool,
}

impl Progress {
    /// Every event of ours at or before `position` has been indexed.
    fn covers(&self, position: EsPosition) -> bool {
        self.last_event.is_some_and(|l| l >= position)
            || self.checkpoint.is_some_and(|c| c > position)
    }
}

impl Index {
    fn new() -> Self {
        Self {
            positions: RwLock::new(Vec::new()),
            progress: watch::channel(Progress::default()).0,
        }
    }

    fn progress(&self) -> Progress {
        *self.progress.borrow()
    }

    fn len(&self) -> u64 {
        self.progress().len
    }

    fn close(&self) {
        self.progress.send_modify(|p| p.closed = true);
    }

    /// Adds the next event; false (and nothing changes) for an event at or
    /// before the last one, i.e. a repeat after resubscribing.
    fn push(&self, position: EsPosition) -> bool {
        let len = {
            let mut positions = self
                .positions
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            if positions.last().is_some_and(|last| position <= *last) {
                return false;
            }
            positions.push(position);
            positions.len() as u64
        };
        self.progress.send_modify(|p| {
            p.len = len;
            p.last_event = Some(position);
            p.resume_after = p.resume_after.max(Some(position));
        });
        true
    }

    fn checkpoint(&self, position: EsPosition) {
        self.progress.send_if_modified(|p| {
            let advanced = p.checkpoint < Some(position);
            if advanced {
                p.resume_after = p.resume_after.max(p.checkpoint);
                p.checkpoint = Some(position);
            }
            advanced
        });
    }

    fn caught_up(&self) {
        self.progress
            .send_if_modified(|p| !std::mem::replace(&mut p.caught_up, true));
    }

    fn position_of(&self, ordinal: Position) -> Option<EsPosition> {
        let index = usize::try_from(ordinal.checked_sub(1)?).ok()?;
        self.positions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(index)
            .copied()
    }

    /// The position just before ordinal `from` (None for the first) and the
    /// positions of ordinals `from..=to`, all indexed.
    fn range(
        &self,
        from: Position,
        to: Position,
    ) -> Result<(Option<EsPosition>, Vec<EsPosition>), StoreError> {
        let positions = self
            .positions
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let missing = || StoreError::Storage(format!("ordinals {from}..={to} are not indexed"));
        let first = usize::try_from(from - 1).map_err(|_| missing())?;
        let last = usize::try_from(to).map_err(|_| missing())?;
        let slice = positions.get(first..last).ok_or_else(missing)?;
        let before = first.checked_sub(1).and_then(|i| positions.get(i).copied());
        Ok((before, slice.to_vec()))
    }

    /// Waits, up to the index timeout, until `done` holds.
    async fn wait(
        &self,
        options: &EsdbOptions,
        what: &str,
        done: impl Fn(&Progress) -> bool,
    ) -> Result<Progress, StoreError> {
        let mut progress = self.progress.subscribe();
        let waited = tokio::time::timeout(
            options.index_timeout,
            progress.wait_for(|p| p.closed || done(p)),
        )
        .await;
        match waited {
            Ok(Ok(p)) if p.closed => Err(StoreError::Closed),
            Ok(Ok(p)) => Ok(*p),
            Ok(Err(_)) => Err(StoreError::Closed),
            Err(_) => Err(StoreError::Storage(format!(
                "the position index did not {what} within {:?} (still catching up, or cut off \
                 from the server)",
                options.index_timeout
            ))),
        }
    }

    /// The ordinals of events of this tracker at `positions`, once indexed.
    async fn ordinals_of(
        &self,
        positions: &[EsPosition],
        options: &EsdbOptions,
    ) -> Result<Vec<Position>, StoreError> {
        let Some(&last) = positions.iter().max() else {
            return Ok(Vec::new());
        };
        // Servers before EventStoreDB 22.6 give an event read from its
        // stream no `$all` position (commit u64::MAX): the index would be
        // waited on until the timeout, at every append.
        if last.commit == u64::MAX {
            return Err(StoreError::Storage(
                "the server gives events read from their stream no $all position: the tracker needs EventStoreDB 22.6 or later (or KurrentDB)"
                    .into(),
            ));
        }
        self.wait(options, "reach the events read", |p| p.covers(last))
            .await?;
        let indexed = self
            .positions
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        positions
            .iter()
            .map(|position| match indexed.binary_search(position) {
                Ok(i) => Ok(i as u64 + 1),
                Err(_) => Err(StoreError::Storage(format!(
                    "the event at $all position {position} is not in the position index \
                     (is it outside the stream prefix?)"
                ))),
            })
            .collect()
    }
}

/// Capped exponential backoff for resubscribing.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(50);

    fn new(max: Duration) -> Self {
        Self {
            next: Self::FIRST,
            max: max.max(Self::FIRST),
        }
    }

    fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }
}

/// Waits for `delay`; false if the store shut down meanwhile.
async fn pause(delay: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    let interrupted = tokio::select! {
        _ = shutdown.wait_for(|closed| *closed) => true,
        () = tokio::time::sleep(delay) => false,
    };
    !interrupted && !*shutdown.borrow()
}

/// The index task: one filtered catch-up subscription to `$all` per store,
/// resubscribing whenever the connection drops after the last event it
/// indexed or an earlier checkpoint (see [`Progress::resume_after`]).
async fn run_indexer(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = Backoff::new(shared.options.max_resubscribe_backoff);
    loop {
        let start = shared
            .index
            .progress()
            .resume_after
            .map_or(StreamPosition::Start, StreamPosition::Position);
        let options = SubscribeToAllOptions::default()
            .position(start)
            .filter(shared.filter());
        let slot = shared.conn.get();
        let mut sub = slot.client.subscribe_to_all(&options).await;
        loop {
            let next = tokio::select! {
                _ = shutdown.wait_for(|closed| *closed) => return,
                next = sub.next_subscription_event() => next,
            };
            match next {
                Ok(SubscriptionEvent::EventAppeared(resolved)) => {
                    backoff.reset();
                    let Some(event) = resolved.event else {
                        continue;
                    };
                    if !event.stream_id.starts_with(&shared.prefix) {
                        // The server-side filter let a foreign event through:
                        // indexing it would shift every later ordinal.
                        tracing::error!(stream = %event.stream_id, position = %event.position, "the $all filter delivered a foreign event; skipped");
                        continue;
                    }
                    shared.index.push(event.position);
                }
                Ok(SubscriptionEvent::Checkpoint(position)) => {
                    backoff.reset();
                    shared.index.checkpoint(position);
                }
                Ok(SubscriptionEvent::CaughtUp) => shared.index.caught_up(),
                Ok(_) => {}
                Err(err) => {
                    let err = shared.conn.failed(slot.generation, "following $all", &err);
                    tracing::warn!(error = %err, "position index subscription dropped; resubscribing");
                    break;
                }
            }
        }
        if !pause(backoff.next_delay(), &mut shutdown).await {
            return;
        }
    }
}

/// State of one [`EventStore::subscribe_all`] stream: its own filtered
/// `$all` subscription, positions from the shared index.
struct Follower {
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    /// The ordinal of the next event to yield.
    next: Position,
    /// Resubscribe after this `$all` position (the last event yielded, or
    /// the checkpoint before the latest: see [`Progress::resume_after`]);
    /// None: from the start.
    resume: Option<EsPosition>,
    /// The latest filter checkpoint of this subscription.
    checkpoint: Option<EsPosition>,
    started: bool,
    sub: Option<(u64, EsSub)>,
    backoff: Backoff,
    /// Consecutive times an ordinal was skipped (then resubscribed).
    gaps: u32,
    done: bool,
}

impl Follower {
    async fn next_item(&mut self) -> Option<Result<RecordedEvent, StoreError>> {
        if self.done || !self.start().await {
            return None;
        }
        loop {
            if self.sub.is_none() {
                let start = self
                    .resume
                    .map_or(StreamPosition::Start, StreamPosition::Position);
                let options = SubscribeToAllOptions::default()
                    .position(start)
                    .filter(self.shared.filter());
                let slot = self.shared.conn.get();
                let sub = slot.client.subscribe_to_all(&options).await;
                self.sub = Some((slot.generation, sub));
            }
            let Some((generation, sub)) = self.sub.as_mut() else {
                continue;
            };
            let generation = *generation;
            let next = tokio::select! {
                _ = self.shutdown.wait_for(|closed| *closed) => {
                    self.done = true;
                    return None;
                }
                next = sub.next_subscription_event() => next,
            };
            match next {
                Ok(SubscriptionEvent::EventAppeared(resolved)) => {
                    let Some(event) = resolved.event else {
                        continue;
                    };
                    if self.resume.is_some_and(|r| event.position <= r) {
                        continue; // a repeat after resubscribing
                    }
                    match self.yield_event(&event).await {
                        Step::Yield(item) => return Some(item),
                        Step::Skip => {}
                        Step::Retry => self.retry().await?,
                        Step::End => return None,
                    }
                }
                Ok(SubscriptionEvent::Checkpoint(position)) => {
                    self.backoff.reset();
                    if self.checkpoint < Some(position) {
                        self.resume = self.resume.max(self.checkpoint);
                        self.checkpoint = Some(position);
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    let err = self.shared.conn.failed(generation, "following $all", &err);
                    tracing::warn!(error = %err, next = self.next, "subscription dropped; resubscribing");
                    self.retry().await?;
                }
            }
        }
    }

    /// Before the first event: the `$all` position to start after, once
    /// the index knows ordinal `next - 1` (a subscription may start beyond
    /// the head and wait). False if the store shut down.
    async fn start(&mut self) -> bool {
        if self.started {
            return true;
        }
        if self.next > 1 {
            let wanted = self.next - 1;
            let mut progress = self.shared.index.progress.subscribe();
            let reached = tokio::select! {
                _ = self.shutdown.wait_for(|closed| *closed) => false,
                reached = progress.wait_for(|p| p.closed || p.len >= wanted) => {
                    reached.is_ok_and(|p| !p.closed)
                }
            };
            if !reached {
                self.done = true;
                return false;
            }
            self.resume = self.shared.index.position_of(wanted);
        }
        self.started = true;
        true
    }

    async fn yield_event(&mut self, event: &EsRecorded) -> Step {
        let ordinal = match self
            .shared
            .index
            .ordinals_of(&[event.position], &self.shared.options)
            .await
        {
            Ok(ordinals) => ordinals.first().copied().unwrap_or_default(),
            Err(StoreError::Closed) => {
                self.done = true;
                return Step::End;
            }
            Err(err) => {
                tracing::warn!(error = %err, "subscription: position not indexed yet");
                return Step::Retry;
            }
        };
        if ordinal < self.next {
            return Step::Skip;
        }
        if ordinal > self.next {
            // Missed events: go back to just after the last one yielded.
            self.gaps += 1;
            tracing::error!(
                expected = self.next,
                got = ordinal,
                "subscription skipped events; resubscribing"
            );
            if self.gaps > 3 {
                self.done = true;
                return Step::Yield(Err(StoreError::Corrupt {
                    position: self.next,
                    reason: format!("the server skips from ordinal {} to {ordinal}", self.next),
                }));
            }
            self.resume = self.shared.index.position_of(self.next - 1);
            self.checkpoint = None;
            self.sub = None;
            return Step::Skip;
        }
        self.gaps = 0;
        self.backoff.reset();
        let decoded = self.shared.decode(event, ordinal);
        if decoded.is_err() {
            self.done = true;
        }
        self.resume = Some(event.position);
        self.next += 1;
        Step::Yield(decoded)
    }

    /// Drops the server subscription and waits before the next one; None if
    /// the store shut down meanwhile.
    async fn retry(&mut self) -> Option<()> {
        self.sub = None;
        if pause(self.backoff.next_delay(), &mut self.shutdown).await {
            Some(())
        } else {
            self.done = true;
            None
        }
    }
}

enum Step {
    Yield(Result<RecordedEvent, StoreError>),
    /// A repeat, or a gap that resubscribing repairs.
    Skip,
    /// Not indexed in time: resubscribe after a pause.
    Retry,
    /// The store shut down.
    End,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(300));
        let delays: Vec<_> = (0..5).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, [50, 100, 200, 300, 300]);
        backoff.reset();
        assert_eq!(backoff.next_delay().as_millis(), 50);
    }

    #[tokio::test]
    async fn a_server_that_gives_stream_reads_no_all_position_is_named_at_once() {
        let options = EsdbOptions {
            index_timeout: Duration::from_secs(30),
            ..EsdbOptions::default()
        };
        let unknown = EsPosition {
            commit: u64::MAX,
            prepare: u64::MAX,
        };
        let started = std::time::Instant::now();
        let refused = Index::new().ordinals_of(&[unknown], &options).await;
        assert!(started.elapsed() < Duration::from_secs(5));
        match refused {
            Err(StoreError::Storage(message)) => {
                assert!(message.contains("EventStoreDB 22.6 or later"), "{message}")
            }
            other => panic!("expected a storage error naming the version, got {other:?}"),
        }
    }

    #[test]
    fn jitter_stays_small() {
        for attempt in 1..40 {
            assert!(jitter(attempt) <= Duration::from_millis(21));
        }
    }

    fn new_event(data: &str) -> NewEvent {
        NewEvent {
            id: Uuid::from_u128(7),
            event_type: "TrailCompleted".into(),
            schema_version: 3,
            data: data.into(),
            metadata: EventMetadata {
                received_at: DateTime::from_timestamp(1_750_000_000, 123_456_789)
                    .unwrap_or_default(),
                source_id: "toolzz-main".into(),
                request_id: "req-1".into(),
                content_hash: "sha256:00".into(),
            },
        }
    }

    #[test]
    fn metadata_round_trips_with_schema_version_and_append_id() {
        let event = new_event("{}");
        let append_id = Uuid::from_u128(99);
        let stored = StoredMetadata {
            received_at: event.metadata.received_at,
            source_id: event.metadata.source_id.clone(),
            request_id: event.metadata.request_id.clone(),
            content_hash: event.metadata.content_hash.clone(),
            schema_version: event.schema_version,
            append_id: Some(append_id),
        };
        let json = serde_json::to_string(&stored).unwrap_or_default();
        assert!(json.contains("\"schema_version\":3"), "{json}");
        assert!(
            json.contains("\"received_at\":\"2025-06-15T15:06:40.123456789Z\""),
            "{json}"
        );
        let back: StoredMetadata = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back.received_at, event.metadata.received_at);
        assert_eq!(back.append_id, Some(append_id));
        // Metadata written without an append id (another writer) still reads.
        let plain = json.replace(&format!(",\"append_id\":\"{append_id}\""), "");
        let back: StoredMetadata = serde_json::from_str(&plain).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back.append_id, None);
    }

    /// The `eventstore` client gives up for good when its first connection
    /// fails; the adapter must replace it rather than stay down forever.
    #[cfg(feature = "test-server")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_whose_first_connection_failed_is_replaced() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap_or_else(|e| panic!("{e}"));
        let settings: ClientSettings = format!("esdb://{addr}?tls=false")
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        let shared = Shared {
            conn: Connection::new(settings, tokio::runtime::Handle::current())
                .unwrap_or_else(|e| panic!("{e}")),
            index: Index::new(),
            prefix: "t-".into(),
            options: EsdbOptions::default(),
        };
        let first = shared.conn.get();
        assert!(
            shared.end_of_all(false).await.is_err(),
            "nothing listens yet"
        );
        assert_eq!(
            shared.conn.get().generation,
            1,
            "the stopped client was replaced"
        );

        let _node = crate::test_server::TestServer::start_at(addr)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        shared
            .end_of_all(false)
            .await
            .unwrap_or_else(|e| panic!("the new client connects: {e}"));
        let stale = first
            .client
            .read_all(&ReadAllOptions::default().max_count(1))
            .await;
        assert!(
            matches!(stale, Err(EsError::ConnectionClosed)),
            "the first client stays stopped, which is why it is replaced: {:?}",
            stale.err()
        );
    }

    fn recorded(revision: u64) -> EsRecorded {
        EsRecorded {
            stream_id: "tracker-s".into(),
            id: Uuid::from_u128(u128::from(revision) + 1),
            revision,
            event_type: "T".into(),
            data: Bytes::new(),
            metadata: HashMap::new(),
            custom_metadata: Bytes::new(),
            is_json: true,
            position: EsPosition {
                commit: 100 * revision,
                prepare: 100 * revision,
            },
            created: DateTime::<Utc>::UNIX_EPOCH,
        }
    }

    #[test]
    fn known_events_grow_only_by_contiguous_revisions() {
        let mut known = Vec::new();
        // From nothing, then only what follows; repeats are ignored.
        assert!(extend_known(&mut known, &[recorded(0), recorded(1)]));
        assert!(extend_known(&mut known, &[recorded(1), recorded(2)]));
        assert_eq!(
            known.iter().map(|k| k.revision).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        assert_eq!(next_revision(&known), 3);
        // A hole means the server's stream is not what we remember.
        assert!(!extend_known(&mut known, &[recorded(5)]));
        assert!(known.is_empty());
        // A truncated stream read from its start begins where it begins.
        assert!(extend_known(&mut known, &[recorded(5), recorded(6)]));
        assert_eq!(known.iter().map(|k| k.revision).collect::<Vec<_>>(), [5, 6]);
    }

    #[test]
    fn encode_accepts_any_text() {
        for data in ["{\"a\":1}", "  {\"a\": 1} \n", "not json", ""] {
            assert!(encode(&new_event(data), Uuid::nil()).is_ok(), "{data:?}");
        }
    }
}
