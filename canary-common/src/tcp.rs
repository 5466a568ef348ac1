//! A connection's payload bytes from the kernel's TCP counters.
//!
//! `tcp_sock.bytes_acked` and `bytes_received` (sockops' `bytes_acked` and
//! `bytes_received`, what `ss -i` shows) move with sequence numbers, and a
//! SYN and a FIN each take one: a client connection's `bytes_acked`
//! includes its own SYN, and its FIN once acknowledged; `bytes_received`
//! includes the peer's FIN. Istio's `istio_tcp_*_bytes_total` count
//! payload, so canary takes those out, judging by the TCP state.

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`).
pub const TCP_ESTABLISHED: u32 = 1;
pub const TCP_FIN_WAIT1: u32 = 4;
pub const TCP_FIN_WAIT2: u32 = 5;
pub const TCP_TIME_WAIT: u32 = 6;
pub const TCP_CLOSE_WAIT: u32 = 8;
pub const TCP_LAST_ACK: u32 = 9;
pub const TCP_CLOSING: u32 = 11;

/// Payload (sent, received) of an established connection that reaches TCP
/// CLOSE from state `left`. From LAST_ACK, FIN_WAIT2 and CLOSING (the last
/// two on the way to TIME_WAIT) both FINs were exchanged; from CLOSE_WAIT
/// (a reset, or a timeout of our FIN) only the peer's; from ESTABLISHED or
/// FIN_WAIT1 (a reset) neither.
#[inline(always)]
pub fn payload_at_tcp_close(left: u32, acked: u64, received: u64) -> (u64, u64) {
    let both = matches!(
        left,
        TCP_LAST_ACK | TCP_FIN_WAIT2 | TCP_CLOSING | TCP_TIME_WAIT
    );
    let peer_fin = both || left == TCP_CLOSE_WAIT;
    let sent = acked.saturating_sub(1 + u64::from(both));
    (sent, received.saturating_sub(u64::from(peer_fin)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_out_the_syn_and_the_fins_the_connection_exchanged() {
        // Server closed first (client: CLOSE_WAIT → LAST_ACK → CLOSE).
        assert_eq!(payload_at_tcp_close(TCP_LAST_ACK, 102, 501), (100, 500));
        // Client closed first (FIN_WAIT2, then TIME_WAIT).
        assert_eq!(payload_at_tcp_close(TCP_FIN_WAIT2, 102, 501), (100, 500));
        assert_eq!(payload_at_tcp_close(TCP_CLOSING, 102, 501), (100, 500));
        // Resets: only the SYN, and the peer's FIN if it came.
        assert_eq!(payload_at_tcp_close(TCP_ESTABLISHED, 101, 500), (100, 500));
        assert_eq!(payload_at_tcp_close(TCP_FIN_WAIT1, 101, 500), (100, 500));
        assert_eq!(payload_at_tcp_close(TCP_CLOSE_WAIT, 101, 501), (100, 500));
        // Never below zero.
        assert_eq!(payload_at_tcp_close(TCP_LAST_ACK, 0, 0), (0, 0));
    }
}
