//! Opaque ListOrders page tokens. Clients must not build or read them, so the format can change; a
//! version byte lets a later format tell old tokens apart.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

use crate::store::PageCursor;

const VERSION: u8 = 1;
const ENCODED_LEN: usize = 1 + size_of::<i64>();

pub fn encode(cursor: PageCursor) -> String {
    let mut bytes = [0u8; ENCODED_LEN];
    bytes[0] = VERSION;
    bytes[1..].copy_from_slice(&cursor.position().to_be_bytes());
    URL_SAFE_NO_PAD.encode(bytes)
}

/// `None` for anything this service did not issue.
pub fn decode(token: &str) -> Option<PageCursor> {
    let bytes: [u8; ENCODED_LEN] = URL_SAFE_NO_PAD.decode(token).ok()?.try_into().ok()?;
    let (version, position) = bytes.split_first()?;
    let position = i64::from_be_bytes(position.try_into().ok()?);
    (*version == VERSION && position > 0).then_some(PageCursor::new(position))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for position in [1, 50, i64::MAX] {
            let cursor = PageCursor::new(position);
            assert_eq!(decode(&encode(cursor)), Some(cursor));
        }
    }

    #[test]
    fn rejects_garbage() {
        for token in [
            "",
            "garbage",
            "!!!!",
            "AQAAAAAAAAAB1",
            &URL_SAFE_NO_PAD.encode([2u8; 9]),
        ] {
            assert_eq!(decode(token), None, "{token:?}");
        }
        let negative = [&[VERSION][..], &(-5i64).to_be_bytes()].concat();
        assert_eq!(decode(&URL_SAFE_NO_PAD.encode(negative)), None);
    }

    proptest::proptest! {
        /// Whatever a client sends as a token, decoding answers; and every issued token round-trips.
        #[test]
        fn any_token_decodes_or_is_refused_without_panicking(token in proptest::prelude::any::<String>()) {
            let _ = decode(&token);
        }

        #[test]
        fn any_bytes_as_base64_decode_or_are_refused(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..16)) {
            if let Some(cursor) = decode(&URL_SAFE_NO_PAD.encode(&bytes)) {
                proptest::prop_assert!(cursor.position() > 0);
            }
        }

        #[test]
        fn issued_tokens_round_trip(position in 1..=i64::MAX) {
            let cursor = PageCursor::new(position);
            proptest::prop_assert_eq!(decode(&encode(cursor)), Some(cursor));
        }
    }
}
