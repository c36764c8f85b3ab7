//! The demo shop's pages: a styled catalog at `/`, product pages, and the
//! drop page for `demo-sneaker` whose Buy button posts to the gateway's
//! `/checkout`, so a person can walk the sale in a browser. Everything is
//! served by the demo origin (styles at `/static/app.css`, pictures as
//! inline SVG): no asset from elsewhere.

use super::checkout::{demo_token, DEMO_SKU, DEMO_STOCK};

/// The shared stylesheet (`/static/app.css`).
pub const APP_CSS: &str = "\
:root{--ink:#1d1d1f;--dim:#6e6e73;--line:#e5e5ea;--accent:#e4002b;--bg:#fafafa}\
*{box-sizing:border-box}\
body{margin:0;font:16px/1.5 system-ui,-apple-system,'Segoe UI',sans-serif;color:var(--ink);background:var(--bg)}\
a{color:inherit;text-decoration:none}\
header.top{display:flex;align-items:center;gap:1.5em;padding:.9em 2em;background:#fff;border-bottom:1px solid var(--line)}\
header.top .logo{font-weight:800;letter-spacing:.08em}\
header.top nav{margin-left:auto;display:flex;gap:1.2em;color:var(--dim)}\
main{max-width:72em;margin:0 auto;padding:1.5em 2em}\
.hero{display:flex;align-items:center;gap:2em;padding:2em;border-radius:14px;background:linear-gradient(120deg,#111,#3a0a12);color:#fff;margin-bottom:2em}\
.hero h1{margin:.1em 0;font-size:2.2em}.hero p{margin:.2em 0;color:#ddd}\
.btn{display:inline-block;padding:.7em 1.6em;border-radius:999px;background:var(--accent);color:#fff;font-weight:700;border:0;font-size:1em;cursor:pointer}\
.btn:disabled{background:#999;cursor:default}\
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(13em,1fr));gap:1.2em}\
.card{background:#fff;border:1px solid var(--line);border-radius:12px;overflow:hidden;transition:box-shadow .15s}\
.card:hover{box-shadow:0 6px 20px rgba(0,0,0,.08)}\
.card .info{padding:.8em 1em}.card .name{font-weight:600}\
.price{font-weight:700}.soldout{color:var(--dim);font-size:.85em}\
.product{display:grid;grid-template-columns:1fr 1fr;gap:2em;align-items:start}\
.product .price{font-size:1.8em}\
#reco{margin-top:1.5em;color:var(--dim)}\
#result{margin-top:1em;font-weight:600;min-height:1.5em}\
.ok{color:#0a7d32}.err{color:var(--accent)}\
svg.pic{display:block;width:100%;height:auto;background:#f2f2f5}\n";

/// The product pages' script: the recommendations, which the gateway
/// degrades to a placeholder under load.
pub const APP_JS: &str = "fetch('/recommendations?product='+document.getElementById('reco').dataset.product)\
.then(r=>r.json()).then(j=>{document.getElementById('reco').textContent=j.items.length?'You may also like: '+j.items.map(p=>p.name).join(', '):'Recommendations are paused while the sale is busy.'});\n";

/// A product picture as inline SVG: a shoe-ish shape in the product's
/// colour (`hue` 0-359).
pub fn picture(hue: u32, label: &str) -> String {
    format!(
        "<svg class=\"pic\" viewBox=\"0 0 200 130\" role=\"img\" aria-label=\"{label}\">\
         <ellipse cx=\"100\" cy=\"112\" rx=\"80\" ry=\"7\" fill=\"#ddd\"/>\
         <path d=\"M25 100 Q30 60 70 62 L95 40 Q110 38 118 55 Q150 70 175 80 Q182 95 175 102 Z\" fill=\"hsl({hue},70%,52%)\"/>\
         <path d=\"M25 100 L175 102 L175 108 Q100 112 25 106 Z\" fill=\"#fff\" stroke=\"#ccc\"/>\
         <path d=\"M80 66 L92 74 M88 58 L100 66 M96 50 L108 58\" stroke=\"#fff\" stroke-width=\"3\"/></svg>"
    )
}

fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title}</title><link rel=\"stylesheet\" href=\"/static/app.css\"></head><body>\
         <header class=\"top\"><a class=\"logo\" href=\"/\">FLASHGATE DEMO SHOP</a>\
         <nav><a href=\"/\">Catalog</a><a href=\"/drop/{DEMO_SKU}\">The drop</a></nav></header>\
         <main>{body}</main></body></html>\n"
    )
}

/// One catalog card.
pub struct Card<'a> {
    pub id: u32,
    pub name: &'a str,
    pub price_cents: u64,
    pub in_stock: bool,
}

fn dollars(cents: u64) -> String {
    format!("${}.{:02}", cents / 100, cents % 100)
}

/// `/`: the drop banner and a grid of products.
pub fn home(cards: &[Card<'_>]) -> String {
    let grid: String = cards
        .iter()
        .map(|c| {
            format!(
                "<a class=\"card\" href=\"/shop/{id}\">{pic}<div class=\"info\"><div class=\"name\">{name}</div>\
                 <div class=\"price\">{price}</div>{stock}</div></a>",
                id = c.id,
                pic = picture((c.id * 47) % 360, c.name),
                name = c.name,
                price = dollars(c.price_cents),
                stock = if c.in_stock { "" } else { "<div class=\"soldout\">Sold out</div>" },
            )
        })
        .collect();
    page(
        "flashgate demo shop",
        &format!(
            "<section class=\"hero\"><div style=\"flex:1\"><p>Limited drop, {DEMO_STOCK} pairs, one per buyer</p>\
             <h1>Demo Sneaker</h1><p>Checkout goes through the gateway to the order core.</p>\
             <p style=\"margin-top:1em\"><a class=\"btn\" href=\"/drop/{DEMO_SKU}\">Go to the drop</a></p></div>\
             <div style=\"width:16em\">{pic}</div></section><h2>Catalog</h2><div class=\"grid\">{grid}</div>",
            pic = picture(350, "Demo Sneaker"),
        ),
    )
}

/// `/shop/{id}`: one product, with its recommendations.
pub fn product(c: &Card<'_>) -> String {
    page(
        c.name,
        &format!(
            "<div class=\"product\"><div>{pic}</div><div><h1>{name}</h1><p class=\"price\">{price}</p>\
             <p>{stock}</p><div id=\"reco\" data-product=\"{id}\"></div></div></div>\
             <script src=\"/static/app.js\"></script>",
            pic = picture((c.id * 47) % 360, c.name),
            name = c.name,
            price = dollars(c.price_cents),
            stock = if c.in_stock { "In stock" } else { "Sold out" },
            id = c.id,
        ),
    )
}

/// `/drop/demo-sneaker`: the Buy button. Each page carries a token for a
/// buyer of its own (`web-<n>`), signed with the demo secret, and one
/// idempotency key: clicking twice never buys twice.
pub fn drop_page(buyer: &str) -> String {
    let token = demo_token(buyer);
    page(
        "Demo Sneaker: the drop",
        &format!(
            "<div class=\"product\"><div>{pic}</div><div><p>Limited drop, one per buyer</p>\
             <h1>Demo Sneaker</h1><p class=\"price\">$129.00</p>\
             <p>Buying as <b>{buyer}</b>. The gateway checks the token, the order core takes one \
             pair out of {DEMO_STOCK} in one atomic step.</p>\
             <button class=\"btn\" id=\"buy\" data-token=\"{token}\" data-sku=\"{DEMO_SKU}\">Buy now</button>\
             <div id=\"result\"></div></div></div>\
             <script>\
             const b=document.getElementById('buy'),out=document.getElementById('result');\
             const key='web-'+Date.now()+'-'+Math.random().toString(16).slice(2);\
             b.onclick=async()=>{{b.disabled=true;out.className='';out.textContent='Placing your order...';\
             try{{const r=await fetch('/checkout',{{method:'POST',headers:{{'authorization':'Bearer '+b.dataset.token,\
             'idempotency-key':key,'content-type':'application/json'}},body:JSON.stringify({{sku:b.dataset.sku,qty:1}})}});\
             const j=await r.json().catch(()=>({{}}));\
             if(r.ok){{out.className='ok';out.textContent='Order placed: '+j.order.id+' ('+j.order.status+')';}}\
             else if(r.status===429){{out.className='err';out.textContent='One pair per buyer: you already have yours.';}}\
             else if(r.status===409){{out.className='err';out.textContent='Sold out.';}}\
             else{{out.className='err';out.textContent='The shop is busy ('+r.status+'): try again.';b.disabled=false;}}}}\
             catch(e){{out.className='err';out.textContent='Network error: try again.';b.disabled=false;}}}};\
             </script>",
            pic = picture(350, "Demo Sneaker"),
        ),
    )
}
