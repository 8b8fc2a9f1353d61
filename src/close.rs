//! Why a session ended: the machine-readable reasons recorded in the
//! database and logs, and the WebSocket close codes the server sends for
//! them. docs/API.md holds the same table for clients.

/// The reason a realtime session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// The client sent a close frame.
    ClientClosed,
    /// The connection dropped without a close frame.
    ClientDisconnected,
    /// The client sent nothing, pong included, for two ping intervals.
    ClientTimeout,
    /// The client did not read what the session sent it fast enough: its
    /// queue filled up.
    ClientTooSlow,
    /// The client broke the WebSocket protocol.
    ProtocolError,
    /// A text message from the client was not valid UTF-8.
    InvalidPayload,
    /// The client sent a message over the size limit.
    MessageTooBig,
    /// The human's limit for the session's kind reached zero.
    UsageLimitExceeded,
    /// The human's tokens were revoked.
    TokenRevoked,
    /// The session reached the server-wide maximum duration.
    SessionTimeLimit,
    /// The service behind the session closed its connection or dropped it.
    UpstreamClosed,
    /// The service behind the session could not be reached, so the session
    /// never started.
    UpstreamUnavailable,
    /// The server is shutting down.
    ServerShutdown,
    /// The store could not record usage, so the session could not be
    /// metered any longer.
    Internal,
    /// The server stopped without closing the session (a crash or kill); it
    /// was closed at the next start, with its usage as of the last tick.
    ServerRestart,
    /// The server metering it went silent (a crash, a kill, a lost
    /// network), and another server sharing the database closed it, with
    /// its usage as of that server's last tick.
    InstanceLost,
    /// The upgrade was accepted but never completed, so nothing was used.
    UpgradeFailed,
}

impl EndReason {
    /// The name stored in the database and shown in logs and close frames.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::ClientClosed => "client_closed",
            EndReason::ClientDisconnected => "client_disconnected",
            EndReason::ClientTimeout => "client_timeout",
            EndReason::ClientTooSlow => "client_too_slow",
            EndReason::ProtocolError => "protocol_error",
            EndReason::InvalidPayload => "invalid_payload",
            EndReason::MessageTooBig => "message_too_big",
            EndReason::UsageLimitExceeded => "usage_limit_exceeded",
            EndReason::TokenRevoked => "token_revoked",
            EndReason::SessionTimeLimit => "session_time_limit",
            EndReason::UpstreamClosed => "upstream_closed",
            EndReason::UpstreamUnavailable => "upstream_unavailable",
            EndReason::ServerShutdown => "server_shutdown",
            EndReason::Internal => "internal",
            EndReason::ServerRestart => "server_restart",
            EndReason::InstanceLost => "instance_lost",
            EndReason::UpgradeFailed => "upgrade_failed",
        }
    }

    /// The close code the server sends when it ends a session for this
    /// reason. `None` where the server sends no close frame of its own
    /// choosing: the client closed first, or the connection is gone.
    pub fn close_code(self) -> Option<u16> {
        match self {
            EndReason::ServerShutdown => Some(1001),
            EndReason::ProtocolError => Some(1002),
            EndReason::InvalidPayload => Some(1007),
            EndReason::ClientTimeout | EndReason::ClientTooSlow => Some(1008),
            EndReason::MessageTooBig => Some(1009),
            EndReason::Internal => Some(1011),
            EndReason::UsageLimitExceeded => Some(4001),
            EndReason::TokenRevoked => Some(4002),
            EndReason::SessionTimeLimit => Some(4004),
            EndReason::UpstreamClosed => Some(4006),
            EndReason::ClientClosed
            | EndReason::ClientDisconnected
            | EndReason::ServerRestart
            | EndReason::InstanceLost
            | EndReason::UpgradeFailed
            | EndReason::UpstreamUnavailable => None,
        }
    }
}
