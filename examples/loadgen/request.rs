//! Requests: the method a call names, found in the descriptors, and its JSON body with `{{…}}`
//! placeholders, encoded through the method's input descriptor.

use super::*;

/// One method and how to build its requests.
#[derive(Clone)]
pub(crate) struct CallPlan {
    /// `package.Service/Method`
    pub(crate) name: Arc<str>,
    pub(crate) path: PathAndQuery,
    pub(crate) client_streaming: bool,
    pub(crate) server_streaming: bool,
    pub(crate) input: MessageDescriptor,
    pub(crate) data: Arc<Template>,
    /// The encoded requests when `data` has no placeholders: encoded once, sent as they are.
    pub(crate) fixed: Option<Arc<[Bytes]>>,
}

impl CallPlan {
    pub(crate) fn new(pool: &DescriptorPool, call: &str, data: &str) -> anyhow::Result<Self> {
        let method = find_method(pool, call)?;
        let name: Arc<str> =
            format!("{}/{}", method.parent_service().full_name(), method.name()).into();
        let path = PathAndQuery::try_from(format!("/{name}"))?;
        let template = Template::parse(data)?;
        let mut plan = Self {
            name,
            path,
            client_streaming: method.is_client_streaming(),
            server_streaming: method.is_server_streaming(),
            input: method.input(),
            data: Arc::new(template),
            fixed: None,
        };
        // Encoding the first request checks the JSON against the descriptor before any call is made.
        let first = plan.encode(0, 0)?;
        if plan.data.is_fixed() {
            plan.fixed = Some(first.into());
        }
        Ok(plan)
    }

    /// The request message(s) of call `number` made by `worker`, encoded.
    pub(crate) fn encode(&self, number: u64, worker: u64) -> anyhow::Result<Vec<Bytes>> {
        if let Some(fixed) = &self.fixed {
            return Ok(fixed.to_vec());
        }
        let json = self.data.render(number, worker);
        let value: serde_json::Value = serde_json::from_str(&json)
            .with_context(|| format!("{}: request is not JSON: {json}", self.name))?;
        let messages = match value {
            serde_json::Value::Array(items) if self.client_streaming => items,
            value if self.client_streaming => vec![value],
            serde_json::Value::Array(_) => {
                bail!("{}: an array is for streaming requests", self.name)
            }
            value => vec![value],
        };
        messages
            .into_iter()
            .map(|value| {
                let message =
                    DynamicMessage::deserialize(self.input.clone(), value).with_context(|| {
                        format!(
                            "{}: request does not fit {}",
                            self.name,
                            self.input.full_name()
                        )
                    })?;
                Ok(Bytes::from(message.encode_to_vec()))
            })
            .collect()
    }
}

/// `package.Service/Method`, `package.Service.Method` or `/package.Service/Method`; or
/// `Service/Method` when one service has that name, so that scenarios survive a renamed package.
pub(crate) fn find_method(pool: &DescriptorPool, call: &str) -> anyhow::Result<MethodDescriptor> {
    let call = call.trim_start_matches('/');
    let (service, method) = call
        .rsplit_once('/')
        .or_else(|| call.rsplit_once('.'))
        .with_context(|| format!("--call {call:?}: expected package.Service/Method"))?;
    let by_short_name = || {
        let mut named = pool
            .services()
            .filter(|candidate| candidate.name() == service);
        named.next().filter(|_| named.next().is_none())
    };
    let service = pool
        .get_service_by_name(service)
        .or_else(by_short_name)
        .with_context(|| {
            let known: Vec<_> = pool.services().map(|s| s.full_name().to_owned()).collect();
            format!("unknown service {service:?}; known: {}", known.join(", "))
        })?;
    service
        .methods()
        .find(|candidate| candidate.name() == method)
        .with_context(|| format!("{} has no method {method:?}", service.full_name()))
}

/// A request with `{{…}}` placeholders, parsed once.
#[derive(Debug, PartialEq)]
pub(crate) struct Template(Vec<Part>);

#[derive(Debug, PartialEq)]
pub(crate) enum Part {
    Text(String),
    RequestNumber,
    WorkerId,
    TimestampUnix,
    Uuid,
    ModRequestNumber(u64),
    DivRequestNumber(u64),
}

impl Template {
    pub(crate) fn parse(source: &str) -> anyhow::Result<Self> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut rest = source;
        while let Some(start) = rest.find("{{") {
            text.push_str(&rest[..start]);
            let end = rest[start..]
                .find("}}")
                .with_context(|| format!("unclosed {{{{ in {source:?}"))?;
            let action = rest[start + 2..start + end].trim();
            rest = &rest[start + end + 2..];
            let words: Vec<&str> = action.split_whitespace().collect();
            let part = match words[..] {
                [".RequestNumber"] => Part::RequestNumber,
                [".WorkerID"] => Part::WorkerId,
                [".TimestampUnix"] => Part::TimestampUnix,
                [".UUID"] | ["newUUID"] | ["uuid"] => Part::Uuid,
                ["mod", ".RequestNumber", n] => Part::ModRequestNumber(positive(n)?),
                ["div", ".RequestNumber", n] => Part::DivRequestNumber(positive(n)?),
                ["env", name] => {
                    // Quoted as in Go templates; inside a JSON string the quotes arrive escaped.
                    let name = name.trim_matches(|c| c == '"' || c == '\\');
                    let value = std::env::var(name)
                        .with_context(|| format!("{{{{env {name:?}}}}}: not set"))?;
                    text.push_str(&json_string_content(value));
                    continue;
                }
                _ => bail!("unknown template action {{{{{action}}}}}"),
            };
            if !text.is_empty() {
                parts.push(Part::Text(std::mem::take(&mut text)));
            }
            parts.push(part);
        }
        text.push_str(rest);
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Self(parts))
    }

    pub(crate) fn is_fixed(&self) -> bool {
        self.0.iter().all(|part| matches!(part, Part::Text(_)))
    }

    pub(crate) fn render(&self, number: u64, worker: u64) -> String {
        let mut out = String::new();
        for part in &self.0 {
            // Writing to a String cannot fail.
            let _ = match part {
                Part::Text(text) => out.write_str(text),
                Part::RequestNumber => write!(out, "{number}"),
                Part::WorkerId => write!(out, "{worker}"),
                Part::TimestampUnix => write!(
                    out,
                    "{}",
                    SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |since| since.as_secs())
                ),
                Part::Uuid => write!(out, "{}", uuid::Uuid::new_v4()),
                Part::ModRequestNumber(n) => write!(out, "{}", number % n),
                Part::DivRequestNumber(n) => write!(out, "{}", number / n),
            };
        }
        out
    }
}

/// `value` escaped as the content of a JSON string, where an `{{env}}` value lands.
pub(crate) fn json_string_content(value: String) -> String {
    let quoted = serde_json::Value::String(value).to_string();
    quoted[1..quoted.len() - 1].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(crate) fn templates_fill_in_numbers_and_fresh_ids() {
        let template = Template::parse(
            r#"{"request_id":"r-{{ .RequestNumber }}-{{.WorkerID}}-{{mod .RequestNumber 3}}-{{div .RequestNumber 2}}","id":"{{uuid}}"}"#,
        )
        .expect("parses");
        assert!(!template.is_fixed());
        let first = template.render(7, 2);
        assert!(
            first.starts_with(r#"{"request_id":"r-7-2-1-3","id":""#),
            "{first}"
        );
        assert_ne!(first, template.render(7, 2), "a fresh uuid per request");
        assert!(Template::parse(r#"{"id":"x"}"#).expect("parses").is_fixed());
        assert!(Template::parse("{{.Nope}}").is_err());
        assert!(Template::parse("{{mod .RequestNumber 0}}").is_err());
        assert!(Template::parse("{{uuid").is_err());
        assert_eq!(
            json_string_content(r#"say "hi" \ now"#.to_owned()),
            r#"say \"hi\" \\ now"#
        );
    }

    #[test]
    pub(crate) fn requests_are_encoded_through_the_descriptors() {
        let pool = descriptor_pool().expect("descriptors");
        // The service's name as built (a generated service has its own package).
        let method = |name: &str| format!("{}/{name}", app::api::ORDER_SERVICE_NAME);
        let call = CallPlan::new(
            &pool,
            &method("GetOrder"),
            r#"{"id":"n-{{.RequestNumber}}"}"#,
        )
        .expect("plan");
        let encoded = call.encode(42, 0).expect("encodes");
        let decoded = app::api::GetOrderRequest::decode(encoded[0].clone()).expect("decodes");
        assert_eq!(decoded.id, "n-42");
        // A field the message does not have is refused before any call is made.
        assert!(CallPlan::new(&pool, &method("GetOrder"), r#"{"nope":1}"#).is_err());
        assert!(CallPlan::new(&pool, &method("Nope"), "{}").is_err());
        // A client stream takes an array, one message per element.
        let update = CallPlan::new(
            &pool,
            &format!("{}.UpdateOrders", app::api::ORDER_SERVICE_NAME),
            r#"[{"order":{"id":"a"}},{"order":{"id":"b"}}]"#,
        )
        .expect("plan");
        assert_eq!(update.encode(0, 0).expect("encodes").len(), 2);
        // The service's short name, as the bench scenarios write it, whatever its package.
        let short = CallPlan::new(&pool, "OrderService/GetOrder", r#"{"id":"x"}"#).expect("plan");
        assert_eq!(short.encode(0, 0).expect("encodes").len(), 1);
        assert!(CallPlan::new(&pool, "NoSuchService/GetOrder", "{}").is_err());
    }
}
