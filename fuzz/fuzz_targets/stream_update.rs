//! The controller stream as the agent decodes it: NodeUpdate messages from protobuf bytes,
//! each converted with every field checked and applied to the state before it (a snapshot
//! first). No panic; a refused update leaves the last state; an accepted state carries the
//! update's digest, references only what it holds, and is reproduced by a snapshot of itself
//! and by the delta from the state before it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use palisade_wire::NodeRuleSet;

fuzz_target!(init: palisade_fuzz::seeds::from_env(palisade_fuzz::seeds::stream), |data: &[u8]| {
    let mut state: Option<NodeRuleSet> = None;
    for update in palisade_fuzz::updates(data) {
        let Ok(next) = palisade_wire::apply("n1", state.as_ref(), &update) else {
            continue;
        };
        let form = palisade_wire::Form {
            shared_lists: update.shared_lists,
            ..palisade_wire::Form::CURRENT
        };
        assert_eq!(palisade_wire::digest_in(&next, form), update.digest);
        let snapshot = palisade_wire::diff(None, &next);
        let again = palisade_wire::apply("n1", None, &snapshot).expect("a snapshot of a state");
        assert_eq!(again, next);
        if let Some(old) = &state {
            let delta = palisade_wire::diff(Some(old), &next);
            let again = palisade_wire::apply("n1", Some(old), &delta).expect("a delta");
            assert_eq!(again, next);
        }
        state = Some(next);
    }
});
