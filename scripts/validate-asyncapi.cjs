// Validates an AsyncAPI document with the official parser (@asyncapi/parser,
// installed by scripts/install-deps): prints every diagnostic, exits 1 on
// any error. Usage: node scripts/validate-asyncapi.cjs <parser dir> <file>
const path = require('path');
const fs = require('fs');
const [parserDir, file] = process.argv.slice(2);
const { Parser } = require(path.join(parserDir, 'node_modules', '@asyncapi', 'parser'));
(async () => {
  const parser = new Parser();
  const { document, diagnostics } = await parser.parse(fs.readFileSync(file, 'utf8'));
  const names = ['error', 'warning', 'info', 'hint'];
  for (const d of diagnostics) {
    console.log(`${names[d.severity]} ${d.code}: ${d.message} at ${d.path.join('.')}`);
  }
  const errors = diagnostics.filter((d) => d.severity === 0);
  if (!document || errors.length > 0) {
    console.log(`${file}: ${errors.length} errors`);
    process.exit(1);
  }
  console.log(`${file}: valid AsyncAPI ${document.version()}`);
})().catch((e) => {
  console.error(e);
  process.exit(2);
});
