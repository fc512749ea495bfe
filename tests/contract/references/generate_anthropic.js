// JSON Schema for the Messages API's answers, from Anthropic's TypeScript SDK (generated from its OpenAPI
// spec; unlike the Python SDK's models it keeps "required but nullable" apart from "optional").
//
//   npm install @anthropic-ai/sdk@VERSION ts-json-schema-generator@2.10.0 typescript
//   node generate_anthropic.js VERSION
const fs = require("fs");
const path = require("path");
const tsj = require("ts-json-schema-generator");

const version = process.argv[2];
const sdk = "node_modules/@anthropic-ai/sdk/resources";
const roots = [
  ["messages/messages.d.ts", "Message"], ["messages/messages.d.ts", "RawMessageStreamEvent"],
  ["messages/messages.d.ts", "MessageTokensCount"], ["shared.d.ts", "ErrorResponse"],
];
const definitions = {};
for (const [file, type] of roots) {
  const schema = tsj.createGenerator({
    path: path.join(sdk, file), type, skipTypeCheck: true, expose: "export", topRef: true,
    additionalProperties: true, jsDoc: "none",
  }).createSchema(type);
  for (const [name, body] of Object.entries(schema.definitions)) {
    if (definitions[name] && JSON.stringify(definitions[name]) !== JSON.stringify(body)) {
      throw new Error(`two SDK types named ${name}`);
    }
    definitions[name] = body;
  }
}
const out = {
  "x-source": {
    package: "@anthropic-ai/sdk (npm)", version, generator: "ts-json-schema-generator@2.10.0",
    generated: new Date().toISOString().slice(0, 10), roots: roots.map(([, type]) => type),
  },
  $schema: "http://json-schema.org/draft-07/schema#",
  definitions: Object.fromEntries(Object.entries(definitions).sort()),
};
fs.writeFileSync(path.join(__dirname, "anthropic-messages.schema.json"), JSON.stringify(out, null, 1) + "\n");
