//! A scratch table for comparing: the rules loaded into it, dormant (its base chains hook
//! nothing while the table is dormant), read back as an image and compared with our
//! table's ([`crate::apply`]'s adoption of a restarted agent's table).

use serde_json::Value;

use super::{msg, Message, NfnlError, NfnlSocket, NLM_F_CREATE, NLM_F_REQUEST};

pub const TABLE: &str = "palisade-compare";
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFT_TABLE_F_DORMANT: u32 = 1;
const DELTABLE: u16 = 2;

/// Creates `inet NAME`, dormant, in one batch (nft 1.0.6's JSON cannot say dormant).
pub fn create_dormant(socket: &mut NfnlSocket, name: &str) -> Result<(), NfnlError> {
    let mut m = Message::nftables(msg::NEWTABLE, NLM_F_REQUEST | NLM_F_CREATE);
    m.attr_str(NFTA_TABLE_NAME, name)
        .attr(NFTA_TABLE_FLAGS, &NFT_TABLE_F_DORMANT.to_be_bytes());
    socket.batch(vec![m], |_| format!("creating table {name}"))
}

/// Deletes `inet NAME` (and everything in it).
pub fn delete(socket: &mut NfnlSocket, name: &str) -> Result<(), NfnlError> {
    let mut m = Message::nftables(DELTABLE, NLM_F_REQUEST);
    m.attr_str(NFTA_TABLE_NAME, name);
    socket.batch(vec![m], |_| format!("deleting table {name}"))
}

/// An nft JSON command with table `from` renamed `to` (the `table` field of objects, the
/// `name` of a table object).
pub fn renamed(mut cmd: Value, from: &str, to: &str) -> Value {
    rename(&mut cmd, from, to);
    cmd
}

fn rename(v: &mut Value, from: &str, to: &str) {
    match v {
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                match value {
                    Value::String(s) if key == "table" && s == from => *s = to.to_string(),
                    Value::Object(table) if key == "table" => {
                        if table.get("name").and_then(Value::as_str) == Some(from) {
                            table.insert("name".into(), Value::String(to.into()));
                        }
                    }
                    other => rename(other, from, to),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| rename(i, from, to)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_table_references_are_renamed() {
        let cmd = json!({"add": {"rule": {"family": "inet", "table": "palisade", "chain": "palisade",
            "expr": [{"jump": {"target": "palisade"}}]}}});
        let want = json!({"add": {"rule": {"family": "inet", "table": "x", "chain": "palisade",
            "expr": [{"jump": {"target": "palisade"}}]}}});
        assert_eq!(renamed(cmd, "palisade", "x"), want);
        let t = json!({"add": {"table": {"family": "inet", "name": "palisade"}}});
        assert_eq!(
            renamed(t, "palisade", "x"),
            json!({"add": {"table": {"family": "inet", "name": "x"}}})
        );
    }
}
