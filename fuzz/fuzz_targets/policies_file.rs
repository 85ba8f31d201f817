//! A policies file, YAML (as palisadectl and the file sources read it) and JSON (one object,
//! as a watch of the API hands it to the controller): no panic; a whole file loads or is
//! refused with errors naming the file; the per-object view agrees with the whole-file one.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(text) = palisade_fuzz::text(data) else {
        return;
    };
    if let Ok((value, duplicates)) = palisade_resources::strict::json_value(&text) {
        if duplicates.is_empty() {
            let _ = palisade_resources::policy_from_value(&value);
        }
    }
    let each = palisade_resources::parse_policies_each(&text);
    match palisade_resources::parse_policies("policies.yaml", &text) {
        Ok(policies) => {
            assert!(
                each.iter().all(Result::is_ok),
                "a file that loads has no bad object"
            );
            assert_eq!(policies.policies.len(), each.len());
            let _ = palisade_policy::compile(&Default::default(), &policies.policies);
        }
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.lines().all(|l| l.starts_with("policies.yaml: ")),
                "every error line names the file: {message}"
            );
        }
    }
});
