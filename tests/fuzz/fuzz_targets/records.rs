//! etcd keys and values may hold anything another writer (or a person with etcdctl) put
//! there. Decoding must never panic, and whatever decodes must encode and decode to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qslice_proto::keys::Keys;
use qslice_proto::records::{
    Assignment, Claim, CoordinatorRecord, Cordon, Maintenance, MoveRequest, NodeRecord, Pin, QueueConfig, RebalanceRequest, Record,
    SliceStatus,
};

fn round_trip<R: Record + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(record) = R::decode(data) {
        let again = R::decode(&record.encode()).expect("an encoded record decodes");
        assert_eq!(again, record, "{} round trip", R::KIND);
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<NodeRecord>(data);
    round_trip::<QueueConfig>(data);
    round_trip::<Assignment>(data);
    round_trip::<Claim>(data);
    round_trip::<SliceStatus>(data);
    round_trip::<Cordon>(data);
    round_trip::<Pin>(data);
    round_trip::<Maintenance>(data);
    round_trip::<RebalanceRequest>(data);
    round_trip::<MoveRequest>(data);
    round_trip::<CoordinatorRecord>(data);
    if let Ok(keys) = Keys::new("fuzz") {
        let mut key = keys.root().as_bytes().to_vec();
        key.extend_from_slice(data);
        let _ = keys.parse(&key);
        let _ = keys.parse(data);
    }
});
