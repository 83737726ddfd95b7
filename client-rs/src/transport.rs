//! How a request reaches one core: over a network connection, or (embedded mode) through the
//! core's in-process inbox. Both carry the same archived request and response bodies, so both
//! modes run the server's validation and apply path unchanged.

use tessera_protocol::{Request, Response};

use crate::connection::{Connection, RemoteStream, Stamped, StreamNext};
use crate::error::Result;

/// A path to one core.
#[derive(Debug)]
pub(crate) enum Transport {
    /// A pipelined TCP connection.
    Remote(Connection),
    /// A core running in this process.
    #[cfg(feature = "embedded")]
    Embedded(crate::embedded::EmbeddedCore),
}

impl Transport {
    pub(crate) fn address(&self) -> &str {
        match self {
            Self::Remote(connection) => connection.address(),
            #[cfg(feature = "embedded")]
            Self::Embedded(core) => core.address(),
        }
    }

    pub(crate) async fn call(&self, request: &Request) -> Result<Response> {
        self.call_stamped(request)
            .await
            .map(|(_, response)| response)
    }

    /// Like [`Transport::call`], with the shard state the response reflects.
    pub(crate) async fn call_stamped(&self, request: &Request) -> Result<Stamped> {
        match self {
            Self::Remote(connection) => connection.call(request).await,
            #[cfg(feature = "embedded")]
            Self::Embedded(core) => core.call(request).await,
        }
    }

    /// Opens a watch: its first reply and, if the reply is `Watching`, its stream.
    pub(crate) async fn open_stream(
        &self,
        request: &Request,
    ) -> Result<(Response, Option<TransportStream>)> {
        match self {
            Self::Remote(connection) => {
                let (response, stream) = connection.open_stream(request).await?;
                Ok((response, stream.map(TransportStream::Remote)))
            }
            #[cfg(feature = "embedded")]
            Self::Embedded(core) => {
                let (response, stream) = core.open_stream(request).await?;
                Ok((response, stream.map(TransportStream::Embedded)))
            }
        }
    }
}

/// The messages pushed for one watch, from either kind of transport.
#[derive(Debug)]
pub(crate) enum TransportStream {
    /// Over a connection.
    Remote(RemoteStream),
    /// From a core in this process.
    #[cfg(feature = "embedded")]
    Embedded(crate::embedded::EmbeddedStream),
}

impl TransportStream {
    pub(crate) async fn next(&mut self) -> StreamNext {
        match self {
            Self::Remote(stream) => stream.next().await,
            #[cfg(feature = "embedded")]
            Self::Embedded(stream) => stream.next().await,
        }
    }

    pub(crate) fn request_progress(&self) {
        match self {
            Self::Remote(stream) => stream.request_progress(),
            #[cfg(feature = "embedded")]
            Self::Embedded(stream) => stream.request_progress(),
        }
    }
}
