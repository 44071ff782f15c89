// Swagger UI for Lantern's /docs.json. When the API wants a key (LANTERN_API_KEYS is set),
// the key the web page keeps for this tab is sent with every request Swagger UI makes,
// the document's own fetch included; without one, the page asks once and keeps it.
(async () => {
  const KEY_STORAGE = "lantern.apiKey"; // the same slot as the web page (app.js)
  let key = sessionStorage.getItem(KEY_STORAGE);
  const headers = () => (key ? { Authorization: `Bearer ${key}` } : {});
  let probe = await fetch("/docs.json", { headers: headers() });
  while (probe.status === 401) {
    key = window.prompt("This Lantern API needs an API key (LANTERN_API_KEYS):");
    if (!key) break;
    probe = await fetch("/docs.json", { headers: headers() });
    if (probe.ok) sessionStorage.setItem(KEY_STORAGE, key);
  }
  window.ui = SwaggerUIBundle({
    url: "/docs.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    requestInterceptor: (request) => {
      if (key) request.headers.Authorization = `Bearer ${key}`;
      return request;
    },
  });
})();
