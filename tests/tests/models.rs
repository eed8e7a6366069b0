//! The model catalogue end to end: Workers AI's `models/search` and `models/schema` and
//! OpenAI's `/v1/models/{id}`, over HTTP against the real binary and model, and through the
//! official `cloudflare` SDKs (Python and npm: `client.ai.models.list()`,
//! `client.ai.models.schema.get()`, `client.ai.run()`; `tests/sdk/cloudflare_client.*`).

use edgerun_e2e::{run_sdk_script, sdk_var, Node, MODEL_ALIAS, TOKEN};
use serde_json::{json, Value};

async fn get(node: &Node, path: &str) -> (u16, Value) {
    let resp = node
        .client
        .get(node.url(path))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    assert_eq!(resp.headers()["content-type"], "application/json", "{path}");
    (status, resp.json().await.unwrap())
}

fn names(list: &Value) -> Vec<String> {
    list["result"]
        .as_array()
        .unwrap_or_else(|| panic!("{list}"))
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalogue_lists_and_describes_what_the_node_serves() {
    let node = Node::start(&[]).await;
    let context = node.health().await["context_window"].as_u64().unwrap();
    let search = "/client/v4/accounts/acct123/ai/models/search";

    let (status, list) = get(&node, search).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["success"], true);
    let served = names(&list);
    assert_eq!(served.len(), 2, "{list}");
    assert!(served.contains(&MODEL_ALIAS.to_string()));
    assert_eq!(
        list["result_info"],
        json!({"count": 2, "page": 1, "per_page": 100, "total_count": 2})
    );
    for entry in list["result"].as_array().unwrap() {
        assert_eq!(entry["task"]["name"], "Text Generation", "{entry}");
        assert_eq!(entry["source"], 1);
        assert_eq!(entry["id"].as_str().unwrap().len(), 36);
        assert!(entry["description"].as_str().unwrap().contains(".gguf"));
        assert_eq!(
            entry["properties"][0],
            json!({"property_id": "context_window", "value": context.to_string()})
        );
    }
    // Filters and pages; past the last page, an empty one.
    let (_, page2) = get(&node, &format!("{search}?per_page=1&page=2")).await;
    assert_eq!(names(&page2), [served[1].clone()]);
    let (_, page3) = get(&node, &format!("{search}?per_page=1&page=3")).await;
    assert_eq!(names(&page3), Vec::<String>::new());
    let (_, meta) = get(
        &node,
        &format!("{search}?author=meta&task=Text%20Generation"),
    )
    .await;
    assert_eq!(names(&meta), [MODEL_ALIAS]);
    let (status, bad) = get(&node, &format!("{search}?per_page=0")).await;
    assert_eq!(
        (status, bad["errors"][0]["code"].clone()),
        (400, json!(5006))
    );

    // The schema is the one the run route validates with.
    let schema = "/client/v4/accounts/acct123/ai/models/schema";
    let (status, s) = get(
        &node,
        &format!("{schema}?model=%40cf%2Fmeta%2Fllama-3-8b-instruct"),
    )
    .await;
    assert_eq!(status, 200, "{s}");
    let prompt = &s["result"]["input"]["oneOf"][0]["properties"];
    assert_eq!(prompt["max_tokens"]["default"], 256);
    assert_eq!(prompt["temperature"]["maximum"], 5.0);
    assert_eq!(prompt["top_k"]["maximum"], 50);
    // Its bounds are the validator's: just past one is refused by the run route.
    let over = node
        .run_json(json!({"prompt": "hi", "top_k": 51}).to_string())
        .await;
    assert_eq!(over["errors"][0]["code"], 5006, "{over}");
    let (status, e) = get(&node, &format!("{schema}?model=nope")).await;
    assert_eq!(status, 400);
    assert_eq!(e["errors"][0]["message"], "No such model nope or task");
    let (status, e) = get(&node, schema).await;
    assert_eq!((status, e["errors"][0]["code"].clone()), (400, json!(5006)));

    // OpenAI's one-model route, the id with raw or encoded slashes.
    for path in [
        "/v1/models/@cf/meta/llama-3-8b-instruct",
        "/v1/models/@cf%2Fmeta%2Fllama-3-8b-instruct",
    ] {
        let (status, m) = get(&node, path).await;
        assert_eq!(status, 200, "{path}: {m}");
        assert_eq!(m["id"], MODEL_ALIAS);
        assert_eq!(m["object"], "model");
    }
    let (_, list) = get(&node, "/v1/models").await;
    let (_, one) = get(&node, &format!("/v1/models/{}", served[0])).await;
    assert!(
        list["data"].as_array().unwrap().contains(&one),
        "{list} {one}"
    );
    let (status, e) = get(&node, "/v1/models/no-such-model").await;
    assert_eq!(status, 404);
    assert_eq!(e["error"]["code"], "model_not_found", "{e}");

    // Every catalogue route needs the token, and answers in its family's shape.
    for (path, openai_shape) in [
        (search.to_string(), false),
        (format!("{schema}?model={MODEL_ALIAS}"), false),
        ("/v1/models/x".to_string(), true),
        ("/ai-api/models/search".to_string(), false),
    ] {
        let resp = node.client.get(node.url(&path)).send().await.unwrap();
        assert_eq!(resp.status(), 401, "{path}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v.get("error").is_some(), openai_shape, "{path}: {v}");
    }
    let resp = node
        .client
        .post(node.url(search))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["allow"], "GET, HEAD");
}

/// Runs an SDK client script against `node`'s `/client/v4`; fails with its output.
async fn run_cloudflare_sdk(node: &Node, program: &str, script: &str) {
    let context = node.health().await["context_window"].to_string();
    let env = [
        ("NODE_PATH", sdk_var("EDGERUN_SDK_NODE_PATH")),
        ("EDGERUN_BASE_URL", node.url("/client/v4")),
        ("EDGERUN_API_KEY", TOKEN.to_string()),
        ("EDGERUN_MODEL", MODEL_ALIAS.to_string()),
        ("EDGERUN_CONTEXT_WINDOW", context),
    ];
    run_sdk_script(program, script, &env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_cloudflare_sdk_lists_and_runs_models() {
    let node = Node::start(&[]).await;
    run_cloudflare_sdk(
        &node,
        &sdk_var("EDGERUN_SDK_CF_PYTHON"),
        "cloudflare_client.py",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_node_cloudflare_sdk_lists_and_runs_models() {
    let node = Node::start(&[]).await;
    run_cloudflare_sdk(&node, "node", "cloudflare_client.cjs").await;
}
