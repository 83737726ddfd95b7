//! How a request reaches one core: over a network connection, or (embedded mode) through the
//! core's in-process inbox. Both carry the same archived request and response bodies, so both
//! modes run the server's validation and apply path unchanged.

use tessera_protocol::{Request, Response};

use crate::connection::Connection;
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
        match self {
            Self::Remote(connection) => connection.call(request).await,
            #[cfg(feature = "embedded")]
            Self::Embedded(core) => core.call(request).await,
        }
    }
}
