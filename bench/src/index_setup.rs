//! Index setup for the runs that measure with indexes (`--indexes`, `--index-build`, and
//! `--workload query`): index definitions go to every core of the cluster, as the client
//! library sends them, over one blocking connection per core. Nothing here runs inside a
//! measured window except [`build_while_measured`], the side thread that creates an index
//! and times its build.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tessera_protocol::codec::{self, FrameBuffer};
use tessera_protocol::{IndexKind, IndexSpec, IndexState, Request, Response};

use crate::workload::{FIELD_MODULI, KEY_PREFIX};

/// How long setup waits for one core's answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a wait for an index polls its state.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// The equality index the benchmark keeps on field `field` of [`FIELD_MODULI`].
pub fn bench_index(field: &str, kind: IndexKind) -> IndexSpec {
    IndexSpec {
        name: format!("bench_{field}_{}", kind.as_str()),
        prefix: KEY_PREFIX.to_vec(),
        field: field.to_owned(),
        kind,
    }
}

/// One blocking connection to one core.
struct CoreLink {
    stream: TcpStream,
    next_id: u64,
    buffer: Vec<u8>,
}

impl CoreLink {
    fn connect(address: &str) -> Result<Self, String> {
        let stream =
            TcpStream::connect(address).map_err(|error| format!("connect {address}: {error}"))?;
        stream
            .set_read_timeout(Some(CALL_TIMEOUT))
            .map_err(|error| error.to_string())?;
        let _ = stream.set_nodelay(true);
        Ok(Self {
            stream,
            next_id: 1,
            buffer: Vec::new(),
        })
    }

    fn call(&mut self, request: &Request) -> Result<Response, String> {
        let mut frame = FrameBuffer::new();
        let id = self.next_id;
        self.next_id += 1;
        codec::encode_request(&mut frame, id, request).map_err(|error| error.to_string())?;
        self.stream
            .write_all(&frame)
            .map_err(|error| format!("send: {error}"))?;
        loop {
            if let Some(size) = codec::frame_size_needed(&self.buffer) {
                if self.buffer.len() >= size {
                    let mut aligned = FrameBuffer::new();
                    aligned.extend_from_slice(&self.buffer[..size]);
                    self.buffer.drain(..size);
                    let frame = codec::decode_frame(&aligned)
                        .map_err(|error| format!("{error:?}"))?
                        .ok_or("a whole frame did not decode")?;
                    if frame.header.request_id != id {
                        continue;
                    }
                    let (_, response) =
                        codec::decode_reply(frame.body).map_err(|error| error.to_string())?;
                    return Ok(response);
                }
            }
            let mut chunk = [0; 8 * 1024];
            let read = self
                .stream
                .read(&mut chunk)
                .map_err(|error| format!("receive: {error}"))?;
            if read == 0 {
                return Err("the server closed the connection".to_owned());
            }
            self.buffer.extend_from_slice(&chunk[..read]);
        }
    }
}

/// Connections to every core of the cluster, to send what every core must answer.
pub struct Cores {
    links: Vec<(String, CoreLink)>,
}

impl Cores {
    /// Connects to every address (one per core).
    ///
    /// # Errors
    /// A core cannot be reached.
    pub fn connect(addresses: &[String]) -> Result<Self, String> {
        let links = addresses
            .iter()
            .map(|address| Ok((address.clone(), CoreLink::connect(address)?)))
            .collect::<Result<_, String>>()?;
        Ok(Self { links })
    }

    fn every_core(&mut self, request: &Request) -> Result<Vec<Response>, String> {
        self.links
            .iter_mut()
            .map(|(address, link)| match link.call(request)? {
                Response::Error(reply) => {
                    Err(format!("{address}: {}: {}", reply.code, reply.message))
                }
                response => Ok(response),
            })
            .collect()
    }

    /// Makes the benchmark's indexes exactly `wanted` (others named `bench_*` are dropped)
    /// and waits until every core has built them.
    ///
    /// # Errors
    /// A core refuses, or a build does not finish within `wait_max`.
    pub fn ensure_indexes(
        &mut self,
        wanted: &[IndexSpec],
        wait_max: Duration,
    ) -> Result<(), String> {
        for response in self.every_core(&Request::ListIndexes)? {
            let Response::Indexes(indexes) = response else {
                return Err(format!("ListIndexes answered {response:?}"));
            };
            for index in indexes {
                if index.spec.name.starts_with("bench_") && !wanted.contains(&index.spec) {
                    self.every_core(&Request::DropIndex {
                        name: index.spec.name,
                    })?;
                }
            }
        }
        for spec in wanted {
            self.every_core(&Request::CreateIndex(Box::new(spec.clone())))?;
        }
        for spec in wanted {
            self.wait_ready(&spec.name, wait_max)?;
        }
        Ok(())
    }

    /// Creates `spec` on every core.
    ///
    /// # Errors
    /// A core refuses.
    pub fn create(&mut self, spec: &IndexSpec) -> Result<(), String> {
        self.every_core(&Request::CreateIndex(Box::new(spec.clone())))
            .map(|_| ())
    }

    /// Drops `name` on every core.
    ///
    /// # Errors
    /// A core refuses.
    pub fn drop_index(&mut self, name: &str) -> Result<(), String> {
        self.every_core(&Request::DropIndex {
            name: name.to_owned(),
        })
        .map(|_| ())
    }

    /// Waits until every core reports `name` ready; returns how long that took.
    ///
    /// # Errors
    /// A core does not know it, or `wait_max` passes first.
    pub fn wait_ready(&mut self, name: &str, wait_max: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        loop {
            let mut ready = true;
            for response in self.every_core(&Request::ListIndexes)? {
                let Response::Indexes(indexes) = response else {
                    return Err(format!("ListIndexes answered {response:?}"));
                };
                match indexes.iter().find(|index| index.spec.name == name) {
                    None => return Err(format!("a core has no index {name:?}")),
                    Some(index) => ready &= index.state == IndexState::Ready,
                }
            }
            if ready {
                return Ok(started.elapsed());
            }
            if started.elapsed() > wait_max {
                return Err(format!("index {name:?} not built after {wait_max:?}"));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

/// The first `count` of the benchmark's equality indexes (on `p10000`, `p100`, `p10`).
///
/// # Errors
/// `count` is more than there are fields.
pub fn first_indexes(count: usize) -> Result<Vec<IndexSpec>, String> {
    if count > FIELD_MODULI.len() {
        return Err(format!(
            "--indexes {count}: the benchmark's writes carry {} fields",
            FIELD_MODULI.len()
        ));
    }
    Ok(FIELD_MODULI[..count]
        .iter()
        .map(|(field, _)| bench_index(field, IndexKind::Equality))
        .collect())
}

/// What the side thread of `--index-build` saw.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BuildTiming {
    /// The index built.
    pub index: String,
    /// Seconds from the create to every core reporting it ready.
    pub build_secs: f64,
}

/// Waits `delay`, creates `spec` on every core, and times its build until every core
/// reports it ready (polling every few milliseconds over the same connections).
///
/// # Errors
/// A core refuses, or the build takes longer than `wait_max`.
pub fn build_while_measured(
    addresses: &[String],
    spec: &IndexSpec,
    delay: Duration,
    wait_max: Duration,
) -> Result<BuildTiming, String> {
    let mut cores = Cores::connect(addresses)?;
    cores.drop_index(&spec.name)?;
    std::thread::sleep(delay);
    let started = Instant::now();
    cores.create(spec)?;
    cores.wait_ready(&spec.name, wait_max)?;
    Ok(BuildTiming {
        index: spec.name.clone(),
        build_secs: started.elapsed().as_secs_f64(),
    })
}
