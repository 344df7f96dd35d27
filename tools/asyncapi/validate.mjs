// Validates AsyncAPI documents with the official parser (@asyncapi/parser): its JSON Schema of
// the spec, reference resolution and its Spectral rules. Prints every diagnostic, one per line,
// and exits 1 if any has severity error, 2 on a usage or read error.
// Usage: node tools/asyncapi/validate.mjs FILE...
import { readFile } from "node:fs/promises";

import { DiagnosticSeverity, Parser } from "@asyncapi/parser";

const SEVERITY_NAMES = {
  [DiagnosticSeverity.Error]: "error",
  [DiagnosticSeverity.Warning]: "warning",
  [DiagnosticSeverity.Information]: "info",
  [DiagnosticSeverity.Hint]: "hint",
};

const files = process.argv.slice(2);
if (files.length === 0) {
  console.error("usage: node tools/asyncapi/validate.mjs FILE...");
  process.exit(2);
}

const parser = new Parser();
let errors = 0;
for (const file of files) {
  let text;
  try {
    text = await readFile(file, "utf8");
  } catch (error) {
    console.error(`${file}: cannot read: ${error.message}`);
    process.exit(2);
  }
  const diagnostics = await parser.validate(text, { source: file });
  for (const { severity, code, message, path } of diagnostics) {
    const where = path.length > 0 ? path.join(".") : "(document)";
    console.log(`${file}: ${SEVERITY_NAMES[severity]} ${code} at ${where}: ${message}`);
  }
  const fileErrors = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Error).length;
  errors += fileErrors;
  console.log(`${file}: ${fileErrors === 0 ? "valid" : "INVALID"} (${diagnostics.length} diagnostic(s), ${fileErrors} error(s))`);
}
process.exit(errors === 0 ? 0 : 1);
