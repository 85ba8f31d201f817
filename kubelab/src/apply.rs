//! Applying arbitrary YAML (policies, Services, anything with a served kind) the way
//! `kubectl apply --server-side` does, so the apiserver validates it for real.

use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::{self, Scope};
use kube::{Api, Client, ResourceExt};
use serde::Deserialize;

use crate::crds::FIELD_MANAGER;
use crate::error::{Error, Result};
use crate::lab::KubeLab;

/// The objects of a multi-document YAML stream; empty documents are skipped.
pub fn parse_objects(source_name: &str, yaml: &str) -> Result<Vec<DynamicObject>> {
    let mut objects = Vec::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let yaml_err = |message: String| Error::Yaml {
            source_name: source_name.into(),
            index,
            message,
        };
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| yaml_err(e.to_string()))?;
        if value.is_null() {
            continue;
        }
        let object: DynamicObject =
            serde_yaml::from_value(value).map_err(|e| yaml_err(e.to_string()))?;
        if object.types.is_none() {
            return Err(yaml_err("apiVersion and kind are required".into()));
        }
        if object.metadata.name.is_none() {
            return Err(yaml_err("metadata.name is required".into()));
        }
        objects.push(object);
    }
    Ok(objects)
}

/// The API of `object`'s kind, looked up in discovery, in its namespace (`default` if a
/// namespaced object names none).
pub(crate) async fn api_for(client: &Client, object: &DynamicObject) -> Result<Api<DynamicObject>> {
    let types = object
        .types
        .as_ref()
        .ok_or_else(|| Error::Other(format!("{} has no apiVersion/kind", object.name_any())))?;
    let gvk = GroupVersionKind::try_from(types).map_err(|e| Error::Other(e.to_string()))?;
    let (resource, caps) = discovery::pinned_kind(client, &gvk).await?;
    Ok(match caps.scope {
        Scope::Namespaced => {
            let ns = object.namespace().unwrap_or_else(|| "default".into());
            Api::namespaced_with(client.clone(), &ns, &resource)
        }
        Scope::Cluster => Api::all_with(client.clone(), &resource),
    })
}

impl KubeLab {
    /// Server-side applies every object in `yaml` (field manager `palisade-kubelab`, forced)
    /// and returns them as stored. Stops at the first object the apiserver rejects.
    pub async fn apply_yaml(&self, yaml: &str) -> Result<Vec<DynamicObject>> {
        let client = self.client().await?;
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let mut applied = Vec::new();
        for object in parse_objects("YAML", yaml)? {
            let api = api_for(&client, &object).await?;
            applied.push(
                api.patch(&object.name_any(), &params, &Patch::Apply(&object))
                    .await?,
            );
        }
        Ok(applied)
    }

    /// Waits until no object named in `yaml` exists any more.
    pub async fn wait_gone_yaml(&self, yaml: &str) -> Result<()> {
        let client = self.client().await?;
        for object in parse_objects("YAML", yaml)? {
            let api = api_for(&client, &object).await?;
            let name = object.name_any();
            self.wait_until(&format!("{name} to disappear"), || async {
                Ok(api.get_opt(&name).await?.is_none())
            })
            .await?;
        }
        Ok(())
    }

    /// Deletes every object named in `yaml`; objects already gone are fine.
    pub async fn delete_yaml(&self, yaml: &str) -> Result<()> {
        let client = self.client().await?;
        for object in parse_objects("YAML", yaml)? {
            let api = api_for(&client, &object).await?;
            match api
                .delete(&object.name_any(), &DeleteParams::default())
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_documents_and_names_the_bad_one() {
        let objects = parse_objects(
            "t",
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n---\n\
             apiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n",
        )
        .unwrap();
        assert_eq!(objects.len(), 2);
        assert_eq!(objects[1].name_any(), "b");
        let err = parse_objects("t", "apiVersion: v1\nkind: Pod\nmetadata: {}\n").unwrap_err();
        assert!(err.to_string().contains("metadata.name"), "{err}");
    }
}
